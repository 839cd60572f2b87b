"""DistributedDataParallel training of a small Llama-shaped model that uses the op: two processes
follow the same loss curve as one device on the whole batch (tests/distributed/ddp_train.py).

On the CPU with gloo everywhere (CI); with NCCL, one process per GPU, where two GPUs exist.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from multi_process import run_torchrun
from rope_env import requires_two_gpus

STEPS = 20
RTOL = 1e-3


def check_run(backend: str, out: Path) -> None:
    run_torchrun("ddp_train.py", "--backend", backend, "--steps", str(STEPS), "--rtol", str(RTOL),
                 "--out", str(out))
    curves = json.loads(out.read_text())
    assert curves["world_size"] == 2
    assert len(curves["ddp"]) == len(curves["single"]) == STEPS
    for step, (ddp, single) in enumerate(zip(curves["ddp"], curves["single"])):
        assert ddp == pytest.approx(single, rel=RTOL), f"step {step}: DDP loss {ddp}, one device {single}"
    # The model must learn: two flat curves would agree without proving anything.
    assert curves["single"][-1] < 0.8 * curves["single"][0]


def test_ddp_on_cpu_with_gloo_matches_one_process(tmp_path: Path) -> None:
    check_run("gloo", tmp_path / "losses.json")


@requires_two_gpus
def test_ddp_on_two_gpus_with_nccl_matches_one_gpu(tmp_path: Path) -> None:
    check_run("nccl", tmp_path / "losses.json")
