"""Tests for features/devices.py: the loader plan (workers and threads)."""

from __future__ import annotations

import pytest

from features.devices import plan_loader

MS = 1e-3


def test_plan_decode_bound_photos_keep_both_cores_decoding() -> None:
    # Camera photos: decoding 30 ms, an onnxruntime forward 7 ms per image.
    plan = plan_loader(
        cpus=2, forward_on_cpu=True, decode_seconds=30 * MS, forward_seconds=7 * MS
    )
    assert (plan.workers, plan.forward_threads, plan.worker_threads) == (2, 1, 1)
    assert plan.rate == pytest.approx(2 / (37 * MS))


def test_plan_forward_bound_jobs_give_the_forward_every_core() -> None:
    # Small images: decoding 3 ms, a torch forward 30 ms per image.
    plan = plan_loader(
        cpus=2, forward_on_cpu=True, decode_seconds=3 * MS, forward_seconds=30 * MS
    )
    assert (plan.workers, plan.forward_threads) == (1, 2)


def test_plan_balances_workers_and_threads_on_many_cores() -> None:
    plan = plan_loader(
        cpus=16, forward_on_cpu=True, decode_seconds=30 * MS, forward_seconds=10 * MS
    )
    # 12 decoders (400/s) and 4 threads (400/s) use the 16 cores evenly.
    assert (plan.workers, plan.forward_threads) == (12, 4)
    assert plan.workers + plan.forward_threads <= 17


def test_plan_respects_fixed_workers_and_threads() -> None:
    plan = plan_loader(
        cpus=8,
        forward_on_cpu=True,
        decode_seconds=30 * MS,
        forward_seconds=7 * MS,
        workers=3,
    )
    # The forward keeps up on 1 thread; the idle cores go to it anyway.
    assert plan.workers == 3 and plan.forward_threads == 5
    fixed = plan_loader(
        cpus=8,
        forward_on_cpu=True,
        decode_seconds=30 * MS,
        forward_seconds=7 * MS,
        workers=2,
        threads=5,
    )
    assert (fixed.workers, fixed.forward_threads) == (2, 5)


def test_plan_without_measurements_or_cores_to_share() -> None:
    unmeasured = plan_loader(
        cpus=4, forward_on_cpu=True, decode_seconds=None, forward_seconds=None
    )
    assert (unmeasured.workers, unmeasured.forward_threads) == (1, 3)
    assert "not measured" in unmeasured.describe()
    one = plan_loader(
        cpus=1, forward_on_cpu=True, decode_seconds=None, forward_seconds=None
    )
    assert (one.workers, one.forward_threads) == (0, 1)
    main = plan_loader(
        cpus=4,
        forward_on_cpu=True,
        decode_seconds=None,
        forward_seconds=None,
        workers=0,
    )
    assert (main.workers, main.forward_threads) == (0, 4)


def test_plan_on_a_gpu_matches_the_devices_rate() -> None:
    plan = plan_loader(
        cpus=16, forward_on_cpu=False, decode_seconds=30 * MS, forward_seconds=5 * MS
    )
    assert plan.workers == 6 and plan.forward_threads == 0  # ceil(30 / 5)
    assert "the forward on the GPU" in plan.describe()
    # A GPU faster than every core can feed: every core but one decodes.
    fast = plan_loader(
        cpus=16, forward_on_cpu=False, decode_seconds=30 * MS, forward_seconds=0.5 * MS
    )
    assert fast.workers == 15


def test_plan_describe_says_what_was_chosen_and_why() -> None:
    plan = plan_loader(
        cpus=2, forward_on_cpu=True, decode_seconds=30 * MS, forward_seconds=7 * MS
    )
    text = plan.describe()
    assert text.startswith(
        "2 decode worker(s) x 1 thread(s), the forward on 1 thread(s)"
    )
    assert "30.0 ms decoding" in text and "7.0 ms forward" in text
