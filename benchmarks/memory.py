"""Peak memory of each stage of the README demo (issue 22, defect 13).

Runs `quadrant demo` in a child process and measures, for every stage that
`quadrant run` and the advisor time (advise: extract, similarity, domain,
costs, size; then extract, sweep, train or finetune, evaluate, export,
predict, report):

- main process peak: the child's own high-water mark (VmHWM), reset at the
  start of each stage through /proc/self/clear_refs, so each stage's peak
  is its own;
- largest process: the largest resident size (RSS) of any one process of
  the tree, sampled every 100 ms: what GNU time's "maximum resident set
  size" reports for the whole job;
- process tree PSS peak: the summed proportional set size of the child and
  all its descendants (DataLoader workers, joblib's loky workers), sampled
  every 100 ms from /proc: what the machine must hold (PSS splits the pages
  that forked workers share; summed RSS would count them once per worker).

Linux only (/proc). Run it alone: other jobs on the machine change nothing
it measures, but it takes the demo's minutes.

    python benchmarks/memory.py --work /tmp/qmem
    python benchmarks/memory.py --work /tmp/qmem --set run.strategy=3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs inside the child: times and peaks of every _timed stage, then the demo.
_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pipeline import run as run_stage
from pipeline.advisor import stage as advise_stage
from pipeline.cli import main

events = []

def high_water_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0

def reset_high_water():
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")

def watched(original, prefix):
    def timed(seconds, name, work):
        reset_high_water()
        start = time.time()
        try:
            return original(seconds, name, work)
        finally:
            events.append([prefix + name, start, time.time(), high_water_kib()])
            reset_high_water()
    return timed

run_stage._timed = watched(run_stage._timed, "")
advise_stage._timed = watched(advise_stage._timed, "advise/")
try:
    code = main(["demo", *sys.argv[2:]])
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(events, out)
raise SystemExit(code)
"""


def _tree(root: int) -> set[int]:
    """`root` and every process descended from it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while listed
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _field_kib(path: str, name: str) -> int:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(name):
                    return int(line.split()[1])
    except OSError:
        pass  # the process ended while read: it holds nothing now
    return 0


def _tree_memory_kib(root: int) -> tuple[int, int]:
    """(summed PSS, largest single RSS) over the tree of `root`.

    PSS splits each page shared after fork() between the processes that
    map it, so the sum is what the machine holds; summed RSS would count
    the parent's pages once per DataLoader worker.
    """
    pids = _tree(root)
    pss = sum(_field_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
    rss = max(_field_kib(f"/proc/{pid}/status", "VmRSS:") for pid in pids)
    return pss, rss


def _sample(
    pid: int, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    while not stop.wait(0.1):
        samples.append((time.time(), *_tree_memory_kib(pid)))


def measure(work: Path, overrides: list[str]) -> tuple[list[list], list, float, int]:
    """The child's stage events, the tree samples, the wall time, its exit code."""
    work.mkdir(parents=True, exist_ok=True)
    events_file = work / "events.json"
    args = [f"run.out='{work / 'run'}'", f"data.root='{work / 'digits'}'"]
    args += ["run.progress=false", *overrides]
    sets = [a for item in args for a in ("--set", item)]
    start = time.time()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO)), str(events_file), *sets],
        cwd=work,
    )
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(child.pid, samples, stop))
    sampler.start()
    code = child.wait()
    stop.set()
    sampler.join()
    return json.loads(events_file.read_text()), samples, time.time() - start, code


def table(events: list[list], samples: list[tuple[float, int, int]]) -> str:
    """One Markdown row per stage: seconds, main-process and tree peaks (MiB)."""
    rows = [
        "| stage | seconds | main process peak (MiB) | largest process (MiB) "
        "| process tree PSS peak (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, start, end, hwm in sorted(events, key=lambda e: e[1]):
        inner = [e[3] for e in events if e[1] >= start and e[2] <= end]
        during = [(pss, rss) for t, pss, rss in samples if start <= t <= end]
        pss = max((p for p, _ in during), default=0) / 1024
        largest = max((r for _, r in during), default=0) / 1024
        rows.append(
            f"| {name} | {end - start:.1f} | {max([hwm, *inner]) / 1024:.0f} | "
            f"{largest:.0f} | {pss:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument(
        "--set", action="append", default=[], help="a conf.toml override, as quadrant"
    )
    args = parser.parse_args()
    events, samples, seconds, code = measure(args.work, args.set)
    print(table(events, samples))
    pss = max((p for _, p, _ in samples), default=0) / 1024
    largest = max((r for _, _, r in samples), default=0) / 1024
    print(
        f"\nwhole demo: {seconds:.0f} s, largest process {largest:.0f} MiB, "
        f"process tree PSS peak {pss:.0f} MiB, exit {code}"
    )


if __name__ == "__main__":
    main()
