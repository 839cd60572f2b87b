"""The Meta kernel and fake tensors: what torch.compile and torch.export see of the op must be
exactly what the real kernels return (sizes, strides, dtype, device) for every layout."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import DEVICES
from rope_kernels.testing import LAYOUTS, RopeArgs, RopeCase, make_args

OPS = {"fused_qk": torch.ops.rope.fused_qk, "fused_qk_backward": torch.ops.rope.fused_qk_backward}

FAKE_CASES = [RopeCase(layout=layout, heads_q=8, heads_k=2) for layout in LAYOUTS] + [
    RopeCase(layout="qkv", positions="bs:int32", dtype=torch.bfloat16, table_width="full", table_leading=2),
    RopeCase(layout="bshd", positions="sb:int64", dtype=torch.float16, table_layout="packed"),
    RopeCase(layout="bshd", batch=1, seq=1, heads_k=1),  # size-1 dims: their strides must agree too
    RopeCase(layout="padded", batch=0),
]


def assert_same_metadata(fake: torch.Tensor, real: torch.Tensor) -> None:
    assert fake.shape == real.shape
    # Exactly, size-1 dims and empty tensors included: the op computes its output strides itself
    # (not through empty_like, whose fake-tensor version differs there).
    assert fake.stride() == real.stride(), (
        f"fake strides {fake.stride()} != real strides {real.stride()} for shape {tuple(real.shape)}")
    assert fake.dtype == real.dtype
    assert fake.storage_offset() == real.storage_offset() == 0


@pytest.mark.parametrize("case", FAKE_CASES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
def test_meta_device_inputs(op_name: str, case: RopeCase) -> None:
    # The CPU kernel's outputs are the yardstick: the Meta kernel must describe them exactly.
    real = OPS[op_name](*make_args(case, "cpu"))
    meta = OPS[op_name](*make_args(case, "meta"))
    for fake_out, real_out in zip(meta, real):
        assert fake_out.device.type == "meta"
        assert_same_metadata(fake_out, real_out)


def fakeify(mode: FakeTensorMode, args: RopeArgs) -> RopeArgs:
    """The same arguments as fake tensors (views stay views, with their strides and offsets)."""
    return RopeArgs(*(None if t is None else mode.from_tensor(t) for t in args))


@pytest.mark.parametrize("case", FAKE_CASES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_fake_tensor_mode(device: str, op_name: str, case: RopeCase) -> None:
    args = make_args(case, device)
    real = OPS[op_name](*args)
    with FakeTensorMode() as mode:
        fake = OPS[op_name](*fakeify(mode, args))
    for fake_out, real_out in zip(fake, real):
        assert isinstance(fake_out, FakeTensor)
        assert fake_out.device == real_out.device
        assert_same_metadata(fake_out, real_out)
