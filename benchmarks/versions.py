"""One benchmark, two versions of quadrant, side by side on one machine.

A change that should not change speed (a refactor) is checked by running the
same benchmark script from a checkout of the base revision and from the
working tree, alternating, and comparing one figure its output prints. The
machines are shared and noisy, so only the paired ratio within this run is
reported: the median over repeats of (this tree's figure / the base's).

Usage:
    python benchmarks/versions.py --base 68c1aab \\
        --figure 'end-to-end files -> HDF5\\s+([\\d.]+)' \\
        -- benchmarks/extract.py --images 500 --repeats 1 --skip-memory
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(tree: Path, command: list[str], pattern: re.Pattern[str]) -> float:
    """Run the benchmark from `tree`; the first figure `pattern` captures."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, *command],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    match = pattern.search(done.stdout)
    if match is None:
        raise SystemExit(f"no figure matching {pattern.pattern!r} in:\n{done.stdout}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare")
    parser.add_argument("--figure", required=True, help="regex; group 1 is the figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("command", nargs="+", help="the benchmark script and options")
    args = parser.parse_args()
    pattern = re.compile(args.figure)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            compare(base, args.command, pattern, args.repeats, args.base)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)],
                cwd=REPO,
                check=False,
            )


def compare(
    base: Path, command: list[str], pattern: re.Pattern[str], repeats: int, rev: str
) -> None:
    ratios = []
    print(f"# {' '.join(command)}; figure /{pattern.pattern}/; base {rev}")
    for i in range(repeats):
        # Alternate which goes first, so a drift in load hits both alike.
        first, second = (base, REPO) if i % 2 == 0 else (REPO, base)
        figures = {tree: run_once(tree, command, pattern) for tree in (first, second)}
        ratios.append(figures[REPO] / figures[base])
        print(
            f"  repeat {i}: base {figures[base]:.2f}, this tree {figures[REPO]:.2f}, "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"median paired ratio (this tree / base) {statistics.median(ratios):.3f} "
        f"over {repeats} repeats (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
