"""One benchmark, two versions of quadrant, side by side on one machine.

A change that should not change speed (a refactor) is checked by running the
same benchmark script from a checkout of the base revision and from the
working tree, alternating, and comparing one figure its output prints. The
machines are shared and noisy, so only the paired ratio within this run is
reported: the median over repeats of (the head's figure / the base's). The
head is the working tree, or another revision with `--head`.

The benchmark script itself is this tree's, copied into the base checkout
(`--script-from-base` keeps the base's own), so both versions are measured
by the same code.

Usage:
    python benchmarks/versions.py --base 68c1aab \\
        --figure 'end-to-end files -> HDF5\\s+([\\d.]+)' \\
        -- benchmarks/extract.py --images 1000 --only-throughput
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
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
    parser.add_argument(
        "--head", help="compare this revision instead of the working tree"
    )
    parser.add_argument("--figure", required=True, help="regex; group 1 is the figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--script-from-base",
        action="store_true",
        help="run the base checkout's own copy of the benchmark script",
    )
    parser.add_argument("command", nargs="+", help="the benchmark script and options")
    args = parser.parse_args()
    pattern = re.compile(args.figure)
    with tempfile.TemporaryDirectory() as tmp:
        base = _checkout(args.base, Path(tmp) / "base")
        head = _checkout(args.head, Path(tmp) / "head") if args.head else REPO
        try:
            if not args.script_from_base:
                script = args.command[0]
                shutil.copy(REPO / script, base / script)
                if head != REPO:
                    shutil.copy(REPO / script, head / script)
            trees = {"base": base, "head": head}
            compare(trees, args.command, pattern, args.repeats, args)
        finally:
            for tree in {base, head} - {REPO}:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)],
                    cwd=REPO,
                    check=False,
                )


def _checkout(rev: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), rev],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return folder


def compare(
    trees: dict[str, Path],
    command: list[str],
    pattern: re.Pattern[str],
    repeats: int,
    args: argparse.Namespace,
) -> None:
    head_name = args.head or "the working tree"
    ratios = []
    print(
        f"# {' '.join(command)}; figure /{pattern.pattern}/; base {args.base}, "
        f"head {head_name}"
    )
    for i in range(repeats):
        # Alternate which goes first, so a drift in load hits both alike.
        order = ("base", "head") if i % 2 == 0 else ("head", "base")
        figures = {name: run_once(trees[name], command, pattern) for name in order}
        ratios.append(figures["head"] / figures["base"])
        print(
            f"  repeat {i}: base {figures['base']:.2f}, head {figures['head']:.2f}, "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"median paired ratio (head / base) {statistics.median(ratios):.3f} "
        f"over {repeats} repeats (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
