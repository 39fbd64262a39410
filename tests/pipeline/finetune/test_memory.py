"""Tests for pipeline/finetune/memory.py: a step's memory is measured and a
step that cannot fit is refused before the first epoch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from features.errors import TrainingError
from pipeline import finetune
from pipeline.config import load_config
from pipeline.finetune import memory
from pipeline.finetune.stage import build_model
from tests.pipeline.finetune.conftest import config, write_classes

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[3]


def _model(size: int) -> tuple[nn.Module, object]:
    cfg = load_config(
        None,
        [
            "backbone.name=resnet18",
            f"finetune.input_size={size}",
            "finetune.init=scratch",
            "finetune.head_init=random",
        ],
    )
    model, prep, _ = build_model(cfg, 3, CPU)
    return model, cfg.finetune


def test_activations_grow_with_the_pixels_and_nothing_changes() -> None:
    model, ft = _model(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    small = memory.step_memory(model, 32, ft, CPU)
    big = memory.step_memory(model, 64, ft, CPU)
    # Four times the pixels, about four times the activations.
    assert 3.5 < big.per_image / small.per_image < 4.5
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert small.fixed == 3 * trainable  # gradients and AdamW's two moments
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training


def test_frozen_layers_keep_no_activations() -> None:
    model, ft = _model(64)
    whole = memory.step_memory(model, 64, ft, CPU)
    for name, p in model.named_parameters():
        p.requires_grad = "fc" in name
    head_only = memory.step_memory(model, 64, ft, CPU)
    assert head_only.per_image < whole.per_image / 50
    assert head_only.fixed < whole.fixed / 100


def test_the_estimate_matches_what_a_step_takes() -> None:
    """The resident growth of a real step of 16 images at 128 px, measured in a
    fresh process (a warm heap would hide it) before the estimate is made."""
    script = """
import torch
from pipeline.finetune import memory
from tests.pipeline.finetune.test_memory import _model

def kib(field):
    with open("/proc/self/status") as status:
        return 1024 * next(int(x.split()[1]) for x in status if x.startswith(field))

model, ft = _model(128)
pixels = torch.zeros(16, 3, 128, 128, dtype=torch.uint8)
resident = kib("VmRSS")
loss = model(pixels).sum()
forward = kib("VmHWM") - resident
loss.backward()
step = kib("VmHWM") - resident
need = memory.step_memory(model, 128, ft, torch.device("cpu"))
moments = 2 * sum(p.numel() * 4 for p in model.parameters())  # AdamW's, not made here
print(forward, 16 * need.per_image, step + moments, need.bytes_for(16))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    forward, activations, step, estimate = map(int, out.stdout.split())
    # The forward's growth adds its temporaries and the allocator's slack
    # (0.72-0.95 of it measured across runs and machines).
    assert 0.6 * forward < activations < 1.1 * forward
    assert 0.7 * step < estimate < 1.3 * step


def test_a_step_that_fits_passes(caplog: pytest.LogCaptureFixture) -> None:
    need = memory.StepMemory(per_image=10 * 2**20, fixed=100 * 2**20)
    ft = load_config(None, ["finetune.batch_size=64"]).finetune
    memory.require_fits(need, ft, 224, CPU, available=2 * memory.GIB)
    memory.require_fits(need, ft, 224, CPU, available=None)  # cannot know: run
    assert not caplog.text


def test_a_step_too_big_names_the_batch_that_fits() -> None:
    need = memory.StepMemory(per_image=80 * 2**20, fixed=40 * 2**20)
    ft = load_config(None, ["finetune.batch_size=64"]).finetune
    with pytest.raises(
        TrainingError,
        match=r"a training step of 64 images at 224 px needs about 6\.0 GiB "
        r"\(80 MiB of activations per image\) of the 2\.0 GiB of memory "
        r"available: it cannot fit; set finetune.batch_size = 16 and "
        r"finetune.accumulate = 4 \(the same effective batch\)",
    ):
        memory.require_fits(need, ft, 224, CPU, available=2 * memory.GIB)


def test_a_step_close_to_the_limit_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    need = memory.StepMemory(per_image=80 * 2**20, fixed=40 * 2**20)
    ft = load_config(None, ["finetune.batch_size=64"]).finetune
    memory.require_fits(need, ft, 224, CPU, available=int(6.5 * memory.GIB))
    assert "it may not fit; to be safe, set finetune.batch_size = 55" in caplog.text


def test_no_batch_fits_says_what_else_to_change() -> None:
    need = memory.StepMemory(per_image=900 * 2**20, fixed=0)
    ft = load_config(None, ["finetune.batch_size=8"]).finetune
    with pytest.raises(TrainingError, match=r"lower finetune.input_size, freeze"):
        memory.require_fits(need, ft, 518, CPU, available=2 * memory.GIB)


def test_available_memory_is_known_on_linux() -> None:
    available = memory.available_bytes(CPU)
    assert available is not None and available > 64 * 2**20


def test_finetune_refuses_before_the_first_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    cfg = config(write_classes(tmp_path / "data"), tmp_path / "run")
    with pytest.raises(TrainingError, match=r"a training step of 8 images at 32 px"):
        finetune.run(cfg)
    assert not (tmp_path / "run" / "finetune").exists()
