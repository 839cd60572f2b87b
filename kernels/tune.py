"""`python -m kernels.tune`: measure every launch shape of the RoPE kernel on this GPU.

The library runs cubins compiled ahead of time with one launch shape (heads per program,
warps) per architecture, element size, head-dim block and grid class, from the table in
kernels/aot_specs.py. This tool is where that table's numbers come from: it JIT-compiles
kernels/rope_kernel.py (the same source the AOT build compiles, specialized as the AOT build
does) for each candidate shape, checks each against the float64 reference, and times it on the
benchmark's workloads:

- kernel time: the profiler's device time per call with the L2 flushed before each call (the
  benchmark's definition), as a ratio to the copy floor measured in the same profile;
- graph time: device time per call with 100 calls captured in one CUDA graph (what decoding
  and other launch-bound rows feel, L2 warm).

For each key of the launch table (element size, head-dim block, wide or narrow grid) it then
names the shape with the lowest geometric mean of kernel-time ratios over the workloads of that
key, each in the program order the launcher picks for its layout (graph time breaks ties within
2%), and prints the rows to put into aot_specs.SM90_LAUNCH_SHAPES (or a table for another arch).

Needs a CUDA GPU and Triton. The library itself is timed alongside when it can be imported
(`ours`), so a run also shows what the shipped table gives. The grid, program order, variant
(pair conventions, even rows) and runtime arguments (rotary_half, copy_end, where the table rows
come from) of every candidate come from the library's launch plan (rope::_launch_plan) of the
workload's call, its options included (rotary_dim, interleaved pairs, layout, cu_seqlens), so the
tuner times exactly the launches the library would make with that shape, and checks them in the
workload's conventions (bench.check).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from bench.check import check_convention
from bench.library import import_rope_kernels
from bench.timing import FULL, QUICK, Figure, make_timer
from bench.workloads import WORKLOADS, Inputs, Workload, make_inputs, workload_by_name

# After bench.workloads, which finds rope_kernels (installed, or built in place in python/).
from rope_kernels.launch_plan import LaunchPlan, launch_plan  # noqa: E402

from . import aot_specs

# Rotation pairs (BLOCK_H x BLOCK_D2) per thread a candidate may hold: below 2 most lanes idle,
# above 64 registers spill; both ends are slow for certain, so they are not worth compiling.
MIN_PAIRS_PER_THREAD: int = 2
MAX_PAIRS_PER_THREAD: int = 64


@dataclasses.dataclass(frozen=True)
class Shape:
    block_h: int
    num_warps: int
    heads_fastest: bool = True  # program order: heads of a token fastest, or the sequence fastest

    @property
    def label(self) -> str:
        return "h{}w{}{}".format(self.block_h, self.num_warps, "" if self.heads_fastest else "-sf")

    @property
    def table_label(self) -> str:
        return "h{}w{}".format(self.block_h, self.num_warps)


def specialized_like_aot(kernel: Any) -> Any:
    """The kernel re-wrapped so that Triton's JIT specializes only what the AOT build hints.

    By default the JIT compiles a separate kernel for an integer argument equal to 1 and assumes
    16-byte alignment for arguments that have it, e.g. seq_len == 1 in decoding. The cubins the
    library ships know only what the aligned variant hints: the q/k/out/cos/sin pointers,
    rotary_half, copy_end and their strides. The tuner timed decode shapes 4 to 10 % faster than
    the same shape compiled ahead of time. Every other runtime parameter is left unspecialized
    here, pos_kind and offsets_kind included: they are runtime arguments of every cubin.

    The JIT types an integer argument by its value: 32-bit when it fits, as every stride of the
    benchmark's workloads does. That matches the aligned cubins, which take 32-bit strides.
    """
    import triton

    hinted = set(aot_specs.ALIGNED_HINTED_PARAMS)
    scalars = [name for name in aot_specs.I32_PARAMS + aot_specs.STRIDE_PARAMS if name not in hinted]
    pointers = [name for name in aot_specs.POINTER_PARAMS if name not in hinted]
    return triton.jit(kernel.fn, do_not_specialize=scalars, do_not_specialize_on_alignment=pointers)


def candidate_shapes(block_d2: int, block_hs: List[int], warps: List[int]) -> List[Shape]:
    shapes = []
    for block_h in block_hs:
        for num_warps in warps:
            pairs_per_thread = block_h * block_d2 / (32 * num_warps)
            if MIN_PAIRS_PER_THREAD <= pairs_per_thread <= MAX_PAIRS_PER_THREAD:
                shapes.append(Shape(block_h, num_warps, True))
                shapes.append(Shape(block_h, num_warps, False))
    return shapes


def as_index_pointer(t: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """What the kernel's pos_ptr and offsets_ptr receive: the index tensor's memory typed int32,
    as the cubins declare them (aot_specs.Variant.signature; the kernel reads int64 ones through a
    cast pointer, pos_kind and offsets_kind say which), or a one-element placeholder where there
    is none (never read: pos_kind or offsets_kind is 0)."""
    if t is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    # Only the address is passed: an int32 view of the same memory (its shape is not used).
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.int64 else t


def plan_of(inputs: Inputs, capability: int, shape: Optional[Shape] = None) -> LaunchPlan:
    """The library's plan of fused_qk on the workload's tensors, as the op takes them (its layout
    and options), with the heads per program and program order of `shape` where given."""
    return launch_plan(inputs.native_q.detach(), inputs.native_k.detach(), inputs.table_cos, inputs.table_sin,
                       inputs.positions, capability=capability,
                       block_h=None if shape is None else shape.block_h,
                       heads_fastest=None if shape is None else shape.heads_fastest, **inputs.options)


def launcher(kernel: Any, inputs: Inputs, q_out: torch.Tensor, k_out: torch.Tensor, shape: Shape,
             capability: int) -> Callable[[], None]:
    """A no-argument call of the JIT kernel (forward rotation) with this shape, from the (B, H, S, D)
    views inputs.q and inputs.k into the (B, H, S, D) views q_out and k_out of outputs laid out as
    the op lays them out. Launched as the library's plan says it would launch that shape: the same
    variant (pair conventions, even rows), grid and program order, and the same runtime arguments
    (rotary_half, copy_end, where the table rows come from)."""
    q, k = inputs.q.detach(), inputs.k.detach()
    cos, sin = inputs.table_cos, inputs.table_sin
    heads_q, seq = q.shape[1], q.shape[2]
    heads_k = k.shape[1]
    plan = plan_of(inputs, capability, shape)
    cu_seqlens: Optional[torch.Tensor] = inputs.options.get("cu_seqlens")
    offsets: Optional[torch.Tensor] = inputs.options.get("seqlen_offsets")
    pos = None if inputs.positions is None else inputs.positions.contiguous()
    # pos_ptr: cu_seqlens for packed sequences, else the positions.
    pos_arg = as_index_pointer(cu_seqlens if cu_seqlens is not None else pos, q.device)
    offsets_arg = as_index_pointer(offsets, q.device)
    n_docs = 0 if cu_seqlens is None else cu_seqlens.numel() - 1
    offsets_kind = 0 if offsets is None else (2 if offsets.dtype == torch.int64 else 1)  # aot_specs.POS_KINDS
    if pos is None:
        pos_strides = (0, 0)
    elif pos.dim() == 1:
        pos_strides = (0, pos.stride(0))  # one (S,) row for every sequence, as the op expands it
    else:
        pos_strides = (pos.stride(0), pos.stride(1))

    def call() -> None:
        kernel[plan.grid](
            q, k, q_out, k_out, cos, sin, pos_arg, offsets_arg,
            seq, heads_q, heads_k, plan.rotary_half, plan.copy_end, cos.shape[0], 1, plan.grid_order,
            plan.pos_kind, n_docs, offsets_kind,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), sin.stride(0),
            0, 0,  # one table shared by every sequence
            pos_strides[0], pos_strides[1],
            BLOCK_D2=plan.block_d2, BLOCK_H=shape.block_h, EVEN_D=plan.even_d,
            READ_INTERLEAVED=plan.read_interleaved, WRITE_INTERLEAVED=plan.write_interleaved, NARROW_GRID=plan.narrow,
            num_warps=shape.num_warps)

    return call


def tune_workload(workload: Workload, block_hs: List[int], warps: List[int], kernel: Any, timer: Any,
                  capability: int, ours: Optional[Any], log: Callable[[str], None]) -> Dict[str, Any]:
    device = timer.device
    inputs = make_inputs(workload, device)
    plan = plan_of(inputs, capability)
    shapes = candidate_shapes(plan.block_d2, block_hs, warps)
    # Outputs laid out as the op lays them out (like its q and k), seen as (B, H, S, D) views.
    q_out = inputs.as_heads(torch.empty_like(inputs.native_q.detach()))
    k_out = inputs.as_heads(torch.empty_like(inputs.native_k.detach()))
    source = torch.randn(inputs.q.numel() + inputs.k.numel(), dtype=workload.dtype, device=device)
    target = torch.empty_like(source)
    figures = [Figure("floor", lambda: target.copy_(source))]
    record: Dict[str, Any] = {"shape": workload.describe(), "block_d2": plan.block_d2, "results": {},
                              "element_size": inputs.q.element_size(),
                              "heads_fastest": plan.grid_order != 2,  # aot_specs.GRID_ORDERS
                              "narrow": plan.narrow}

    calls: Dict[str, Callable[[], None]] = {}
    if ours is not None:
        q, k = inputs.native_q.detach(), inputs.native_k.detach()
        calls["ours"] = lambda: ours(q, k, inputs.table_cos, inputs.table_sin, inputs.positions, **inputs.options)
    for shape in shapes:
        call = launcher(kernel, inputs, q_out, k_out, shape, capability)
        q_out.fill_(float("nan"))
        k_out.fill_(float("nan"))
        call()
        check = check_convention("q", q_out, inputs.q, inputs, False).combined(
            check_convention("k", k_out, inputs.k, inputs, False))
        if not check.passed:
            record["results"][shape.label] = {"error": check.message}
            log("  {:<8} FAILED: {}".format(shape.label, check.message))
            continue
        calls[shape.label] = call
    figures += [Figure(label, call) for label, call in calls.items()]

    with torch.no_grad():
        kernel_us = timer.kernel_times(figures)
        floor = kernel_us.get("floor")
        record["floor_us"] = floor
        for label, call in calls.items():
            measured = kernel_us.get(label)
            entry: Dict[str, Any] = {"kernel_us": measured if isinstance(measured, float) else None}
            if isinstance(measured, float) and isinstance(floor, float):
                entry["kernel_x"] = measured / floor
            else:
                entry["error"] = str(measured)
            try:
                entry["graph_us"] = timer.graph_us(call)
            except Exception as error:  # noqa: BLE001
                entry["graph_error"] = str(error)
            record["results"][label] = entry
    return record


def _fmt(value: Optional[float], spec: str) -> str:
    return format(value, spec) if isinstance(value, float) else "-"


def print_workload(name: str, record: Dict[str, Any], log: Callable[[str], None]) -> None:
    log("{} ({}), floor {} µs".format(name, record["shape"], _fmt(record.get("floor_us"), ".2f")))
    rows = sorted(record["results"].items(), key=lambda kv: kv[1].get("kernel_x") or math.inf)
    for label, entry in rows:
        log("  {:<8} kernel {:>9} µs {:>7}x   graph {:>7} µs {}".format(
            label, _fmt(entry.get("kernel_us"), ".2f"), _fmt(entry.get("kernel_x"), ".3f"),
            _fmt(entry.get("graph_us"), ".2f"), entry.get("error", "")))


def recommend(records: Dict[str, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """Per head-dim block: the shape with the lowest geometric mean kernel ratio over its workloads
    (graph time, summed, breaks near-ties)."""
    by_block: Dict[Tuple[int, int, bool], List[Dict[str, Any]]] = {}
    for record in records.values():
        key = (record["element_size"], record["block_d2"], record["narrow"])
        by_block.setdefault(key, []).append(record)
    choice: Dict[Tuple[int, int, bool], Dict[str, Any]] = {}
    for block_d2, group in sorted(by_block.items()):
        # Each workload scored in the program order the launcher picks for its layout.
        def result(r: Dict[str, Any], label: str) -> Dict[str, Any]:
            return r["results"].get(label if r["heads_fastest"] else label + "-sf", {})

        labels = set.intersection(*({k for k in r["results"] if not k.endswith("-sf")} for r in group)) - {"ours"}
        scored = []
        for label in labels:
            ratios = [result(r, label).get("kernel_x") for r in group]
            graphs = [result(r, label).get("graph_us") for r in group]
            if any(not isinstance(x, float) for x in ratios):
                continue
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            graph = sum(g for g in graphs if isinstance(g, float))
            scored.append((geo, graph, label))
        if not scored:
            continue
        best_geo = min(s[0] for s in scored)
        near = [s for s in scored if s[0] <= best_geo * 1.02]
        geo, graph, label = min(near, key=lambda s: (s[1], s[0]))
        choice[block_d2] = {"shape": label, "geomean_kernel_x": geo, "graph_us_sum": graph,
                            "workloads": [r["name"] for r in group]}
    return choice


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="all", help="comma-separated names (default: all)")
    parser.add_argument("--block-h", default="1,2,4,8,16,32,64", help="heads per program to try")
    parser.add_argument("--warps", default="1,2,4,8,16", help="warps per program to try")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    from . import rope_kernel

    kernel = specialized_like_aot(getattr(rope_kernel, aot_specs.KERNEL_NAME))
    # The library's launch plan places every candidate, and its op is timed as `ours`.
    import_rope_kernels()
    ours: Optional[Any] = torch.ops.rope.fused_qk

    device = torch.device("cuda", torch.cuda.current_device())
    timer = make_timer(device, QUICK if args.quick else FULL)
    names = [w.name for w in WORKLOADS] if args.workloads == "all" else args.workloads.split(",")
    block_hs = [int(x) for x in args.block_h.split(",")]
    warps = [int(x) for x in args.warps.split(",")]
    capability = torch.cuda.get_device_capability(device)
    arch = 10 * capability[0] + capability[1]
    print("{} (sm_{}{}), torch {}".format(torch.cuda.get_device_name(device), *capability, torch.__version__))

    records: Dict[str, Dict[str, Any]] = {}
    for name in names:
        workload = workload_by_name(name)
        record = tune_workload(workload, block_hs, warps, kernel, timer, arch, ours, print)
        record["name"] = name
        records[name] = record
        print_workload(name, record, print)

    choice = recommend(records)
    print("\nRecommended launch shapes (arch sm_{}{}):".format(*capability))
    for (element_size, block_d2, narrow), picked in choice.items():
        print("  {}-byte dtype, BLOCK_D2 {:>3}, {} grid: {:<8} geomean kernel {:.3f}x over {}".format(
            element_size, block_d2, "narrow" if narrow else "wide", picked["shape"], picked["geomean_kernel_x"],
            ", ".join(picked["workloads"])))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(device),
                                              "capability": list(capability), "workloads": records,
                                              "recommended": {"{}-byte/d{}/{}".format(k[0], k[1], "narrow" if k[2] else "wide"): v
                                                              for k, v in choice.items()}},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
