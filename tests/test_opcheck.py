"""torch.library.opcheck on both ops: schema, autograd registration, fake tensor kernel and
AOT dispatch (dynamic shapes), on samples that do and do not require grad."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import DEVICES
from rope_kernels.testing import RopeCase, make_args

# A few samples that between them cover the layouts, positions, table forms and dtypes that
# change what the fake kernel or autograd has to say. Each opcheck costs about a second.
OPCHECK_CASES = [
    RopeCase(),
    RopeCase(layout="bshd", positions="bs:int64", table_width="full", table_leading=2),
    RopeCase(layout="qkv", positions="s:int32", dtype=torch.bfloat16, table_dtype="same", heads_q=8, heads_k=1),
    RopeCase(layout="padded", positions="sb:int64", dtype=torch.float16, head_dim=10, table_layout="packed"),
    RopeCase(layout="bshd", positions="bs:int32", per_sequence_tables=True, batch=3, table_width="full"),
]

OPS = {
    "fused_qk": torch.ops.rope.fused_qk.default,
    "fused_qk_backward": torch.ops.rope.fused_qk_backward.default,
}


def opcheck_call(case: RopeCase, device: str, requires_grad: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """args and kwargs of one call; positions, when given, goes by keyword as users write it."""
    args = make_args(case, device, requires_grad=requires_grad)
    positional = (args.q, args.k, args.cos, args.sin)
    kwargs = {} if args.positions is None else {"positions": args.positions}
    return positional, kwargs


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str, op_name: str, case: RopeCase, requires_grad: bool) -> None:
    args, kwargs = opcheck_call(case, device, requires_grad)
    torch.library.opcheck(OPS[op_name], args, kwargs)
