"""A Ctrl-C while loader workers fork stops the process the first time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_png

REPO = Path(__file__).resolve().parents[2]

# Sends SIGINT from inside the first fork's at-fork handler: the moment at
# which Python used to drop the KeyboardInterrupt (fault audit, issue 22).
_CTRL_C_AT_FORK = """
import os, signal, sys
sys.path.insert(0, {repo!r})
fired = []
def ctrl_c():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
os.register_at_fork(before=ctrl_c)
"""

_LOADER = """
import torch
from torch.utils.data import DataLoader
from features.interrupts import InterruptibleLoader
cls = InterruptibleLoader if sys.argv[1] == "held" else DataLoader
try:
    for _ in cls(list(range(8)), batch_size=2, num_workers=1):
        pass
    print("finished")
except KeyboardInterrupt:
    print("interrupted")
"""


def _python(
    code: str, *args: str, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CTRL_C_AT_FORK.format(repo=str(REPO)) + code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_a_plain_loader_loses_the_first_ctrl_c_and_ours_does_not() -> None:
    # The plain DataLoader shows the defect: the interrupt is dropped.
    assert _python(_LOADER, "plain").stdout.strip() == "finished"
    assert _python(_LOADER, "held").stdout.strip() == "interrupted"


@pytest.mark.parametrize("command", ["finetune", "extract"])
def test_the_first_ctrl_c_stops_a_command_with_exit_130(
    command: str, tmp_path: Path
) -> None:
    for c in ("a", "b"):
        for i in range(8):
            write_png(tmp_path / "data" / c / f"{i}.png", seed=i)
    (tmp_path / "conf.toml").write_text(
        '[data]\nroot = "data"\n[run]\nout = "run"\nprogress = false\n'
        '[backbone]\nname = "resnet18"\nweights = "random"\ninput_size = 32\n'
        '[extract]\nnum_workers = 1\nengine = "torch"\n'
        '[finetune]\ninit = "scratch"\nnum_workers = 1\nepochs = 3\n'
    )
    cli = f"from pipeline.cli import main\nraise SystemExit(main([{command!r}]))\n"
    result = _python(cli, cwd=tmp_path)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
