"""Every kind of bad input is refused with a RuntimeError that names the op and the problem.

Every backend (CPU, Meta, CUDA) must refuse the same inputs with the same message: the Meta
kernel is what torch.compile consults, so a bad call fails at trace time as it would in eager.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import requires_cuda
from rope_kernels.testing import RopeArgs, RopeCase, make_args

SEQ = 5


def valid(device: str, dtype: torch.dtype = torch.float32, head_dim: int = 8) -> RopeArgs:
    """Good arguments (B=2, Hq=4, Hk=2, S=5, a table of exactly S rows) that each bad case spoils once."""
    case = RopeCase(batch=2, heads_q=4, heads_k=2, seq=SEQ, head_dim=head_dim, dtype=dtype, table_rows=SEQ,
                    positions="bs:int64")
    return make_args(case, device)._replace(positions=None)


def with_positions(device: str, positions: torch.Tensor) -> RopeArgs:
    return valid(device)._replace(positions=positions.to(device))


def with_table(args: RopeArgs, cos: torch.Tensor, sin: torch.Tensor) -> RopeArgs:
    return args._replace(cos=cos, sin=sin)


def expanded(device: str, batch: int, heads_q: int, seq: int) -> RopeArgs:
    """Sizes past the CUDA launch's limits, named by stride-0 views that hold almost no memory."""
    one = torch.randn(1, 1, 1, 8, device=device)
    table = torch.randn(4, 4, device=device)
    positions = torch.zeros(1, dtype=torch.int32, device=device).expand(seq)
    return RopeArgs(one.expand(batch, heads_q, seq, 8), one.expand(batch, 1, seq, 8), table, table.clone(), positions)


@dataclasses.dataclass(frozen=True)
class BadInput:
    name: str
    build: Callable[[str], RopeArgs]  # device -> arguments with exactly one thing wrong
    problem: str  # regex the message must contain after the op's name
    devices: tuple[str, ...] = ("cpu", "meta", "cuda")


BAD_INPUTS = [
    BadInput("odd_head_dim", lambda d: valid(d, head_dim=7)._replace(cos=valid(d).cos[:, :3], sin=valid(d).sin[:, :3]),
             r"head_dim must be even"),
    BadInput("zero_head_dim", lambda d: valid(d)._replace(q=valid(d).q[..., :0], k=valid(d).k[..., :0]),
             r"head_dim must be even and positive"),
    BadInput("qk_dtype_mismatch", lambda d: valid(d)._replace(k=valid(d).k.half()), r"q and k must have the same dtype"),
    BadInput("int_dtype", lambda d: valid(d)._replace(q=valid(d).q.int(), k=valid(d).k.int()),
             r"must be float16, bfloat16, float32.*got Int"),
    BadInput("fp64_on_cuda", lambda d: valid(d, dtype=torch.float64), r"Double are not supported on CUDA", devices=("cuda",)),
    BadInput("q_rank_3", lambda d: valid(d)._replace(q=valid(d).q[0]), r"q must be 4-D"),
    BadInput("k_rank_5", lambda d: valid(d)._replace(k=valid(d).k[None]), r"k must be 4-D"),
    BadInput("batch_mismatch", lambda d: valid(d)._replace(k=valid(d).k[:1]), r"same batch size"),
    BadInput("seq_mismatch", lambda d: valid(d)._replace(k=valid(d).k[:, :, :SEQ - 1]), r"same sequence length"),
    BadInput("head_dim_mismatch", lambda d: valid(d)._replace(k=torch.cat([valid(d).k] * 2, dim=-1)), r"same head_dim"),
    BadInput("table_shorter_than_seq", lambda d: with_table(valid(d), valid(d).cos[:SEQ - 1], valid(d).sin[:SEQ - 1]),
             r"cos and sin have 4 rows but the sequence has 5 tokens"),
    BadInput("table_width", lambda d: with_table(valid(d), torch.cat([valid(d).cos] * 3, -1)[:, :5],
                                                 torch.cat([valid(d).sin] * 3, -1)[:, :5]),
             r"head_dim/2 \(4\) or head_dim \(8\) columns; got 5"),
    BadInput("table_twice_too_wide", lambda d: with_table(valid(d), torch.cat([valid(d).cos] * 4, -1),
                                                          torch.cat([valid(d).sin] * 4, -1)),
             r"columns; got 16"),
    BadInput("cos_sin_shapes_differ", lambda d: with_table(valid(d), valid(d).cos, torch.cat([valid(d).sin] * 2, -1)),
             r"cos and sin must have the same shape"),
    BadInput("cos_sin_dtypes_differ", lambda d: with_table(valid(d, dtype=torch.float16), valid(d).cos,
                                                           valid(d).sin.half()),
             r"cos and sin must have the same dtype"),
    BadInput("table_dtype_neither_fp32_nor_q", lambda d: with_table(valid(d, dtype=torch.float16),
                                                                    valid(d).cos.bfloat16(), valid(d).sin.bfloat16()),
             r"cos and sin must be float32 or q's dtype"),
    BadInput("tables_not_one_per_sequence", lambda d: with_table(valid(d), valid(d).cos.expand(3, -1, -1),
                                                                 valid(d).sin.expand(3, -1, -1)),
             r"cos of shape \[3, 5, 4\] holds 3 tables \(one per sequence\), but q and k have a batch of 2"),
    BadInput("table_4d", lambda d: with_table(valid(d), valid(d).cos.expand(2, 2, -1, -1),
                                              valid(d).sin.expand(2, 2, -1, -1)),
             r"cos must be \(max_seq, head_dim/2\) or \(max_seq, head_dim\), one table for every sequence, or "
             r"\(batch, max_seq, ...\) with one per sequence"),
    BadInput("table_1d", lambda d: with_table(valid(d), valid(d).cos[0], valid(d).sin[0]), r"cos must be \(max_seq"),
    BadInput("positions_float", lambda d: with_positions(d, torch.zeros(2, SEQ)), r"positions must be int32 or int64"),
    BadInput("positions_longer_than_seq", lambda d: with_positions(d, torch.zeros(2, SEQ + 1, dtype=torch.int64)),
             r"positions must have shape \(batch, seq\)"),
    BadInput("positions_wrong_batch", lambda d: with_positions(d, torch.zeros(3, SEQ, dtype=torch.int64)),
             r"positions must have shape"),
    BadInput("positions_1d_wrong_length", lambda d: with_positions(d, torch.zeros(SEQ - 1, dtype=torch.int32)),
             r"positions must have shape"),
    BadInput("positions_3d", lambda d: with_positions(d, torch.zeros(2, SEQ, 1, dtype=torch.int64)),
             r"positions must have shape"),
    # Devices that differ. The dispatcher sends a call with any meta tensor to the Meta kernel, and
    # one with any CUDA tensor to the CUDA kernel: each must find the mismatch itself.
    BadInput("k_on_meta", lambda d: valid("cpu")._replace(k=valid("meta").k), r"q and k must be on the same device",
             devices=("cpu",)),
    BadInput("table_on_meta", lambda d: with_table(valid("cpu"), valid("meta").cos, valid("meta").sin),
             r"cos and sin must be on q's device", devices=("cpu",)),
    BadInput("positions_on_meta",
             lambda d: valid("cpu")._replace(positions=torch.zeros(2, SEQ, dtype=torch.int64, device="meta")),
             r"positions must be on q's device", devices=("cpu",)),
    BadInput("k_on_cpu", lambda d: valid(d)._replace(k=valid("cpu").k), r"q and k must be on the same device",
             devices=("cuda",)),
    BadInput("table_on_cpu", lambda d: with_table(valid(d), valid("cpu").cos, valid("cpu").sin),
             r"cos and sin must be on q's device", devices=("cuda",)),
    BadInput("positions_on_cpu", lambda d: valid(d)._replace(positions=torch.zeros(2, SEQ, dtype=torch.int64)),
             r"positions must be on q's device", devices=("cuda",)),
    BadInput("more_tokens_than_the_grid_takes", lambda d: expanded(d, batch=2**16, heads_q=1, seq=2**15),
             r"batch \* seq_len \(65536 \* 32768\) exceeds the CUDA grid limit of 2\^31 - 1 tokens",
             devices=("cuda",)),
    BadInput("more_heads_than_32_bits_count", lambda d: expanded(d, batch=1, heads_q=2**31 - 64, seq=1),
             r"q and k have 2147483584 \+ 1 heads, more than the CUDA kernel's 32-bit head index takes",
             devices=("cuda",)),
    BadInput("head_dim_over_the_built_limit_on_cuda",
             lambda d: valid(d, head_dim=rope_kernels.build_info()["cuda_max_head_dim"] + 2),
             r"head_dim above 512 is not supported on CUDA",
             devices=("cuda",)),
]


def bad_input_params() -> list[Any]:
    params = []
    for bad in BAD_INPUTS:
        for device in bad.devices:
            marks = [requires_cuda] if device == "cuda" else []
            params.append(pytest.param(device, bad, id=f"{device}-{bad.name}", marks=marks))
    return params


OPS = {"fused_qk": torch.ops.rope.fused_qk, "fused_qk_backward": torch.ops.rope.fused_qk_backward}


def refusal(op_name: str, args: RopeArgs) -> str:
    """The message of the RuntimeError the op raises for args."""
    with pytest.raises(RuntimeError) as info:
        OPS[op_name](*args)
    return str(info.value)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize(("device", "bad"), bad_input_params())
def test_bad_input_is_refused(device: str, bad: BadInput, op_name: str, requires_grad: bool) -> None:
    args = bad.build(device)
    if requires_grad:
        # The same refusal must come through the autograd kernel, before it records anything.
        if not (args.q.is_floating_point() and args.k.is_floating_point()):
            pytest.skip("integer tensors cannot require grad")
        args = args._replace(q=args.q.detach().requires_grad_(), k=args.k.detach().requires_grad_())
    message = refusal(op_name, args)
    assert message.startswith(f"rope::{op_name}: "), f"message does not start with the op's name: {message!r}"
    assert re.search(bad.problem, message), f"message does not say {bad.problem!r}: {message!r}"
