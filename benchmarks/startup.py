"""Start-up time of the command line: `quadrant --help` and `--version`.

A user who types `quadrant --help` should get it at once, not after torch,
torchvision and scikit-learn have loaded. Measured side by side, interleaved,
in fresh processes:

- `python -c pass` and `python -c "import argparse"`: the floor;
- `quadrant --version` and `quadrant --help` (the installed console script);
- `quadrant layers --list`, a command that does need torch, for scale.

Goals (issue 9): --help and --version under 0.5 s on a quiet 2-core machine,
and never more than 2x `python -c "import argparse"`.

Usage:
    python benchmarks/startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import argparse'": [sys.executable, "-c", "import argparse"],
    "quadrant --version": ["quadrant", "--version"],
    "quadrant --help": ["quadrant", "--help"],
    "quadrant layers --list": ["quadrant", "layers", "--list"],
}


def _resolve(command: list[str]) -> list[str]:
    if command[0] != "quadrant":
        return command
    script = Path(sys.executable).with_name("quadrant")
    found = str(script) if script.exists() else shutil.which("quadrant")
    if found is None:
        raise SystemExit("the `quadrant` console script is not installed")
    return [found, *command[1:]]


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    commands = {name: _resolve(c) for name, c in COMMANDS.items()}
    for command in commands.values():  # warm the file cache once
        _time(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():  # interleaved
            times[name].append(_time(command))
    floor = statistics.median(times["python -c 'import argparse'"])
    print(f"medians of {args.repeats} interleaved runs, fresh processes")
    print(f"{'command':<30} {'median s':>9} {'min s':>7} {'x argparse':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<30} {median:>9.3f} {min(values):>7.3f} {median / floor:>10.2f}x")


if __name__ == "__main__":
    main()
