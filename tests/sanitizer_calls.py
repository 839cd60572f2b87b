"""Calls that reach every kernel of the CUDA table and every path of the launcher, each on exact-size
buffers and checked against the float64 reference: the script .ci/gpu_sanitizer.sh runs under
compute-sanitizer, and tests/test_sanitizer_calls.py runs on every device.

Two groups:
- one call per built variant of kernels.aot_specs (dtype, table dtype, BLOCK_D2, pairs read and
  written, aligned or not, even or masked rows, wide or narrow grid), each built so that the
  launcher picks that variant (the test checks it with rope::_launch_plan);
- the launcher's paths on one variant family: every op (pair and single, out of place, in place,
  backward) with every source of table rows (none, positions of either width and shape,
  cu_seqlens of either width with and without offsets, rows outside the table), every layout,
  every grid order (flat past 65535 batches or tokens), every table form, and empty tensors.

Each tensor is its own buffer whose last element is the view's last element; a misaligned one
starts one element into its buffer, and that element must survive the call. With the caching
allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) every buffer is its own device allocation, so
memcheck sees a read or write one element past any of them.

    python tests/sanitizer_calls.py [--device cuda] [--list]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_kernels.testing import assert_close_to_reference, reference_rope

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels import aot_specs  # noqa: E402

PAIR_OPS = ("fused_qk", "fused_qk_", "fused_qk_backward")
SINGLE_OPS = ("fused", "fused_", "fused_backward")
OPS = PAIR_OPS + SINGLE_OPS
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Where q and k lie: their own dense buffers, one buffer of q's heads then k's (a fused
# projection), a (B, S, H, D) buffer passed transposed as bhsd, or one element into a buffer.
MEMORY = ("dense", "fused", "transposed", "misaligned")
# Where table rows come from.
POSITIONS = ("none", "int32", "int64", "int64_shared", "cu_seqlens_int32", "cu_seqlens_int64")
# cos/sin forms: (rows, R/2), (rows, R), one table per sequence (B, rows, R/2), leading size-1 dims.
TABLES = ("half", "full", "per_sequence", "leading")


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of one op, described by what it takes; `inputs` builds its tensors."""

    op: str
    dtype: str
    table_dtype: str  # "same" or "fp32"
    layout: str  # the op's layout argument
    memory: str
    batch: int  # 1 for thd
    seq: int  # tokens for thd
    heads_q: int
    heads_k: int  # 0 for the single-tensor ops
    head_dim: int
    rotary_dim: Optional[int] = None
    interleaved: bool = False
    interleaved_out: Optional[bool] = None
    positions: str = "none"
    offsets: Optional[str] = None  # dtype name of seqlen_offsets, with cu_seqlens
    documents: Tuple[int, ...] = ()  # lengths, with cu_seqlens
    table: str = "half"
    outside_rows: bool = False  # some positions outside the table (NaN tokens)
    variant: Optional[int] = None  # the table index the call is built to reach

    @property
    def name(self) -> str:
        parts = [self.op, self.dtype, "tab-" + self.table_dtype, self.layout, self.memory,
                 "x".join(map(str, (self.batch, self.seq, self.heads_q, self.heads_k, self.head_dim)))]
        if self.rotary_dim is not None:
            parts.append(f"r{self.rotary_dim}")
        parts.append(("il" if self.interleaved else "hs") + "-" + {None: "same", False: "hs", True: "il"}[
            self.interleaved_out])
        parts.append("pos-" + self.positions + ("+off-" + self.offsets if self.offsets else ""))
        parts.append(self.table + ("-outside" if self.outside_rows else ""))
        if self.variant is not None:
            parts.insert(0, f"v{self.variant}")
        return "/".join(parts)

    @property
    def single(self) -> bool:
        return self.op in SINGLE_OPS

    @property
    def inplace(self) -> bool:
        return self.op.endswith("_")

    @property
    def backward(self) -> bool:
        return self.op.endswith("backward")

    @property
    def rotary(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def table_rows(self) -> int:
        if self.positions.startswith("cu_seqlens"):
            return max(self.documents, default=0) + (3 if self.offsets else 0)
        return self.seq + (3 if self.positions != "none" else 0)

    def options(self) -> Dict[str, Any]:
        return {"interleaved": self.interleaved, "interleaved_out": self.interleaved_out,
                "rotary_dim": self.rotary_dim, "layout": self.layout}

    def inputs(self, device: str, seed: int = 0, fill: bool = True) -> "Inputs":
        return _make_inputs(self, device, torch.Generator().manual_seed(seed), fill)


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: Optional[torch.Tensor]  # None for the single-tensor ops
    cos: torch.Tensor
    sin: torch.Tensor
    positions: Optional[torch.Tensor]
    kwargs: Dict[str, Any]  # every keyword argument, the index tensors included
    guards: List[Tuple[torch.Tensor, torch.Tensor]]  # (buffer element outside a view, its value)


def _exact(shape: Tuple[int, ...], dtype: torch.dtype, device: str, generator: torch.Generator, fill: bool,
           offset: int = 0) -> torch.Tensor:
    """A contiguous tensor that ends at the last element of its own buffer, `offset` elements in."""
    numel = math.prod(shape)
    if fill:
        buffer = torch.randn(offset + numel, generator=generator, dtype=torch.float64).to(dtype).to(device)
    else:
        buffer = torch.empty(offset + numel, dtype=dtype, device=device)
    return buffer[offset:].view(shape)


def _heads_shape(c: Call, heads: int) -> Tuple[int, ...]:
    if c.layout == "thd":
        return (c.seq, heads, c.head_dim)
    if c.layout == "bshd":
        return (c.batch, c.seq, heads, c.head_dim)
    return (c.batch, heads, c.seq, c.head_dim)


def _make_heads(c: Call, device: str, generator: torch.Generator, fill: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]]]:
    dtype = TORCH_DTYPES[c.dtype]
    heads_axis = 1 if c.layout == "bhsd" else -2
    guards: List[Tuple[torch.Tensor, torch.Tensor]] = []
    if c.memory == "fused":
        both = _exact(_heads_shape(c, c.heads_q + c.heads_k), dtype, device, generator, fill)
        q, k = both.split((c.heads_q, c.heads_k), dim=heads_axis)
        return q, None if c.single else k, guards
    if c.memory == "transposed":  # (B, S, H, D) memory as a bhsd view
        assert c.layout == "bhsd"

        def bshd(heads: int) -> torch.Tensor:
            return _exact((c.batch, c.seq, heads, c.head_dim), dtype, device, generator, fill).transpose(1, 2)

        return bshd(c.heads_q), None if c.single else bshd(c.heads_k), guards
    offset = 1 if c.memory == "misaligned" else 0
    tensors = []
    for heads in (c.heads_q, c.heads_k):
        t = _exact(_heads_shape(c, heads), dtype, device, generator, fill, offset)
        if offset and fill:
            before = t.as_strided((1,), (1,), t.storage_offset() - 1)
            guards.append((before, before.clone()))
        tensors.append(t)
    return tensors[0], None if c.single else tensors[1], guards


def _make_inputs(c: Call, device: str, generator: torch.Generator, fill: bool) -> Inputs:
    q, k, guards = _make_heads(c, device, generator, fill)
    table_dtype = TORCH_DTYPES[c.dtype] if c.table_dtype == "same" else torch.float32
    rows = c.table_rows
    width = c.rotary if c.table == "full" else c.rotary // 2
    shape: Tuple[int, ...] = {"half": (rows, width), "full": (rows, width),
                              "per_sequence": (c.batch, rows, width), "leading": (1, 1, rows, width)}[c.table]
    cos, sin = (_exact(shape, table_dtype, device, generator, fill) for _ in range(2))
    kwargs = c.options()
    positions = None
    if c.positions.startswith("cu_seqlens"):
        bounds = [0]
        for length in c.documents:
            bounds.append(bounds[-1] + length)
        index_dtype = torch.int32 if c.positions.endswith("int32") else torch.int64
        kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=index_dtype, device=device)
        if c.offsets is not None:
            offsets = torch.randint(0, 4, (len(c.documents),), generator=generator)
            if c.outside_rows and len(c.documents) > 0:
                offsets[-1] = rows  # the last document lies past the table's end
            kwargs["seqlen_offsets"] = offsets.to(getattr(torch, c.offsets)).to(device)
    elif c.positions != "none":
        shape_p = (c.seq,) if c.layout == "thd" or c.positions == "int64_shared" else (c.batch, c.seq)
        low, high = (-2, rows + 2) if c.outside_rows else (0, rows)
        values = torch.randint(low, high, shape_p, generator=generator)
        if values.numel() > 0 and not c.outside_rows:
            values.view(-1)[-1] = rows - 1  # the table's last row is read
        positions = values.to(torch.int32 if c.positions == "int32" else torch.int64).to(device)
    return Inputs(q, k, cos, sin, positions, kwargs, guards)


def run(c: Call, inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    """The op's results: its outputs, or for the in-place ops the tensors it rotated."""
    op = getattr(torch.ops.rope, c.op)
    tables = (inputs.cos, inputs.sin, inputs.positions)
    if c.single:
        out = op(inputs.q, *tables, **inputs.kwargs)
        return (inputs.q if c.inplace else out,)
    out = op(inputs.q, inputs.k, *tables, **inputs.kwargs)
    return (inputs.q, inputs.k) if c.inplace else tuple(out)


def check(c: Call, device: str, seed: int = 0) -> None:
    """Runs the call on `device` and compares every result with the float64 reference."""
    inputs = c.inputs(device, seed)
    sources = [inputs.q] + ([] if inputs.k is None else [inputs.k])
    before = [t.detach().cpu().clone() for t in sources]
    expected = [reference_rope(x, inputs.cos, inputs.sin, inputs.positions, c.backward, **inputs.kwargs)
                for x in before]
    results = run(c, inputs)
    assert len(results) == len(expected), c.name
    for got, want in zip(results, expected):
        assert_close_to_reference(got, want, TORCH_DTYPES[c.dtype])
    if not c.inplace:
        for source, original in zip(sources, before):
            assert torch.equal(source.cpu(), original), f"{c.name}: an input changed"
    for element, value in inputs.guards:
        assert torch.equal(element, value), f"{c.name}: the element before a view changed"


def plan(c: Call, capability: int = 90) -> Any:
    """rope::_launch_plan of the call (a backward call plans as the forward that reads and writes
    its pairs the other way round; a single-tensor call as the pair op with a k of no heads)."""
    from rope_kernels.launch_plan import launch_plan

    inputs = c.inputs("cpu", fill=False)
    kwargs = dict(inputs.kwargs)
    if c.backward:
        written = c.interleaved if c.interleaved_out is None else c.interleaved_out
        kwargs["interleaved"], kwargs["interleaved_out"] = written, c.interleaved
    k = inputs.k
    if k is None:
        k = inputs.q.narrow(1 if c.layout == "bhsd" else -2, 0, 0)
    return launch_plan(inputs.q, k, inputs.cos, inputs.sin, inputs.positions, capability=capability,
                       inplace=c.inplace, **kwargs)


# ----------------------------------------------------------------------------------------------
# The calls

# Head vectors of a wide and of a narrow launch: the narrow class is below 16384
# (kNarrowBelowHeadVectors in csrc/cuda/kernel_table.h).
WIDE_PAIR = dict(batch=2, seq=512, heads_q=12, heads_k=4)
WIDE_SINGLE = dict(batch=2, seq=512, heads_q=16, heads_k=0)
NARROW_PAIR = dict(batch=2, seq=5, heads_q=4, heads_k=2)
NARROW_SINGLE = dict(batch=2, seq=5, heads_q=6, heads_k=0)
WIDE_DOCUMENTS = (300, 0, 500, 224)
NARROW_DOCUMENTS = (3, 7)


def _variant_call(v: aot_specs.Variant, ordinal: int) -> Call:
    """A call that the launcher serves with variant v."""
    below = aot_specs.BLOCK_D2_VALUES[v.block - 1] if v.block > 0 else 0
    memory = "dense"
    if v.even_d:
        rotary_half = v.block_d2
    elif v.aligned:
        # Rows shorter than BLOCK_D2 where alignment allows one (a multiple of 16 above the block below).
        shorter = v.block_d2 - aot_specs.ALIGNED_HALF_DIM_MULTIPLE
        rotary_half = shorter if shorter > below and (not v.narrow or ordinal % 2 == 0) else v.block_d2
    elif ordinal % 2 == 0:
        rotary_half, memory = v.block_d2, "misaligned"  # full rows one element off 16 bytes
    else:
        rotary_half = v.block_d2 - 1  # an odd number of pairs
    partial = ordinal % 3 == 0 and 2 * rotary_half + 16 <= 2 * aot_specs.BLOCK_D2_VALUES[-1]
    head_dim = 2 * rotary_half + (16 if partial else 0)
    op = ("fused_qk", "fused_qk_", "fused_qk_backward", "fused", "fused_", "fused_backward")[ordinal % 6]
    layout = ("bhsd", "bshd", "thd", "bhsd")[ordinal % 4]
    if memory == "dense":
        memory = ("dense", "transposed")[ordinal % 2] if layout == "bhsd" else ("dense", "fused")[ordinal % 2]
        if memory == "fused" and op in SINGLE_OPS:
            memory = "dense"
    single = op in SINGLE_OPS
    sizes = dict((NARROW_SINGLE if single else NARROW_PAIR) if v.narrow else (WIDE_SINGLE if single else WIDE_PAIR))
    documents: Tuple[int, ...] = ()
    if layout == "thd":
        documents = NARROW_DOCUMENTS if v.narrow else WIDE_DOCUMENTS
        sizes.update(batch=1, seq=sum(documents))
        positions = ("none", "int32", "cu_seqlens_int32", "cu_seqlens_int64", "int64")[ordinal % 5]
    else:
        positions = ("none", "int32", "int64_shared", "int64")[ordinal % 4]
    if not positions.startswith("cu_seqlens"):
        documents = ()
    interleaved, written = v.read_interleaved, v.write_interleaved
    if op.endswith("backward"):  # the gradient reads the pairs as the forward wrote them
        interleaved, written = written, interleaved
    return Call(op=op, dtype=aot_specs.QK_DTYPES[v.qk], table_dtype=aot_specs.TABLE_DTYPES[v.table],
                layout=layout, memory=memory, head_dim=head_dim,
                rotary_dim=2 * rotary_half if partial else None, interleaved=interleaved,
                interleaved_out=written if written != interleaved or ordinal % 2 else None,
                positions=positions, offsets="int32" if positions.startswith("cu_seqlens") and ordinal % 2 else None,
                documents=documents, table=TABLES[(ordinal // 2) % len(TABLES)], variant=v.index, **sizes)


def variant_calls() -> List[Call]:
    """One call per built variant."""
    return [_variant_call(v, i) for i, v in enumerate(aot_specs.built_variants())]


def _path_call(op: str, layout: str, positions: str, ordinal: int, **changes: Any) -> Call:
    single = op in SINGLE_OPS
    sizes: Dict[str, Any] = dict(NARROW_SINGLE if single else NARROW_PAIR)
    documents: Tuple[int, ...] = ()
    if layout == "thd":
        documents = (3, 0, 6, 1)
        sizes.update(batch=1, seq=sum(documents))
    if not positions.startswith("cu_seqlens"):
        documents = ()
    fields: Dict[str, Any] = dict(
        op=op, dtype=("bf16", "fp16", "fp32")[ordinal % 3], table_dtype=("fp32", "same")[ordinal % 2],
        layout=layout, memory="dense", head_dim=64, rotary_dim=(None, 48)[ordinal % 2],
        interleaved=bool(ordinal % 4 >= 2), positions=positions, documents=documents,
        table=TABLES[ordinal % len(TABLES)], **sizes)
    fields.update(changes)
    return Call(**fields)


def path_calls() -> List[Call]:
    """Every op with every source of rows and layout; the grid orders; empty tensors."""
    calls: List[Call] = []
    sources = {
        "bhsd": [("none", {}), ("int32", {}), ("int64_shared", {}), ("int64", {"outside_rows": True})],
        "bshd": [("none", {}), ("int32", {"outside_rows": True}), ("int64_shared", {}), ("int64", {})],
        "thd": [("none", {}), ("int32", {}), ("cu_seqlens_int32", {}), ("cu_seqlens_int64", {"offsets": "int32"}),
                ("cu_seqlens_int32", {"offsets": "int64", "outside_rows": True})],
    }
    for op in OPS:
        for layout, kinds in sources.items():
            for positions, changes in kinds:
                calls.append(_path_call(op, layout, positions, len(calls), **changes))
    for op in OPS:
        heads_k = 0 if op in SINGLE_OPS else 1
        # Flat grids: more batches than a grid's y/z extent, and more tokens than y holds.
        calls.append(_path_call(op, "bhsd", "none", len(calls), batch=65536, seq=1, heads_q=1, heads_k=heads_k,
                                head_dim=32, rotary_dim=None, table="half"))
        calls.append(_path_call(op, "thd", "int32", len(calls), batch=1, seq=70000, heads_q=1, heads_k=heads_k,
                                head_dim=32, rotary_dim=None, table="half"))
        calls.append(_path_call(op, "bshd", "none", len(calls), batch=1, seq=70000, heads_q=1, heads_k=heads_k,
                                head_dim=32, rotary_dim=None, table="half"))
        # Empty tensors: no batch, no tokens, no k heads, no documents' tokens.
        calls.append(_path_call(op, "bhsd", "int32", len(calls), batch=0))
        calls.append(_path_call(op, "bshd", "none", len(calls), seq=0))
        calls.append(_path_call(op, "bhsd", "none", len(calls), heads_k=0))
        calls.append(_path_call(op, "thd", "cu_seqlens_int64", len(calls), batch=1, seq=0, documents=(0, 0)))
    return calls


def all_calls() -> List[Call]:
    return variant_calls() + path_calls()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--list", action="store_true", help="print the calls and exit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    calls = all_calls()
    if args.list:
        print("\n".join(c.name for c in calls))
        return 0
    for i, c in enumerate(calls):
        try:
            check(c, args.device, args.seed + i)
        except Exception as error:
            print(f"FAILED {c.name}: {error}", file=sys.stderr)
            return 1
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"{len(calls)} calls on {args.device} match the float64 reference "
          f"({len(variant_calls())} reach one built variant each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
