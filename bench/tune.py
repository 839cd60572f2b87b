"""`python -m bench.tune`: measure every launch shape of the RoPE kernel on this GPU.

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
(`ours`), so a run also shows what the shipped table gives.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .library import REPO_ROOT, import_rope_kernels
from .reference import check_rotation
from .timing import FULL, QUICK, Figure, make_timer
from .workloads import WORKLOADS, Inputs, Workload, make_inputs, workload_by_name

KERNEL_PATH: Path = REPO_ROOT / "kernels" / "rope_kernel.py"
SPECS_PATH: Path = REPO_ROOT / "kernels" / "aot_specs.py"

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


def launcher_heads_fastest(q: torch.Tensor) -> bool:
    """The order the library's launcher picks (csrc/cuda/rope_launch.cpp): heads fastest unless
    the heads of a token lie further apart than its neighbouring tokens (a (B, H, S, D) layout)."""
    return q.size(2) == 1 or q.stride(1) <= q.stride(2)


def load_source_module(path: Path, name: str) -> Any:
    """A module of the repository's build sources (kernels/), which is not a package, by its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# The build's specialization table, and its copy of the launcher's choice of a variant.
SPECS: Any = load_source_module(SPECS_PATH, "rope_aot_specs")


def specialized_like_aot(kernel: Any, specs: Any) -> Any:
    """The kernel re-wrapped so that Triton's JIT specializes only what the AOT build hints.

    By default the JIT compiles a separate kernel for an integer argument equal to 1 and assumes
    16-byte alignment for arguments that have it, e.g. seq_len == 1 in decoding. The cubins the
    library ships know only what the aligned variant hints: the q/k/out/cos/sin pointers,
    half_dim and their strides. The tuner timed decode shapes 4 to 10 % faster than the same
    shape compiled ahead of time. Every other runtime parameter is left unspecialized here.

    The JIT types an integer argument by its value: 32-bit when it fits, as every stride of the
    benchmark's workloads does. That matches the aligned cubins, which take 32-bit strides.
    """
    import triton

    hinted = set(specs.ALIGNED_HINTED_PARAMS)
    scalars = [name for name in specs.I32_PARAMS + specs.STRIDE_PARAMS if name not in hinted]
    pointers = [name for name in specs.POINTER_PARAMS if name not in hinted]
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


# CUDA's limit on a grid's y and z extents.
MAX_GRID_YZ: int = 65535


def launch_grid(batch: int, seq: int, n_blocks: int, heads_fastest: bool) -> Tuple[Tuple[int, int, int], int]:
    """The grid and grid_order value the library's launcher uses (choose_grid in
    csrc/cuda/rope_launch.cpp); grid_order numbers aot_specs.GRID_ORDERS."""
    if batch <= MAX_GRID_YZ:
        if heads_fastest and seq <= MAX_GRID_YZ:
            return (n_blocks, seq, batch), 1
        if not heads_fastest and n_blocks <= MAX_GRID_YZ:
            return (seq, n_blocks, batch), 2
    return (batch * seq * n_blocks, 1, 1), 0


def launcher(kernel: Any, inputs: Inputs, q_out: torch.Tensor, k_out: torch.Tensor, block_d2: int,
             shape: Shape, narrow: bool) -> Callable[[], None]:
    """A no-argument call of the JIT kernel on these tensors (forward rotation), specialized as the
    library's launcher picks for them (the workloads' inputs are all aligned)."""
    q, k = inputs.q.detach(), inputs.k.detach()
    cos, sin, pos = inputs.table_cos, inputs.table_sin, inputs.positions
    batch, heads_q, seq, head_dim = q.shape
    heads_k = k.shape[1]
    n_blocks = -(-(heads_q + heads_k) // shape.block_h)  # q's heads then k's, one axis
    grid, grid_order = launch_grid(batch, seq, n_blocks, shape.heads_fastest)
    even_d = SPECS.launcher_even_d(head_dim // 2, True, narrow)
    pos_arg = pos if pos is not None else q  # never read without HAS_POS
    pos_strides = (pos.stride(0), pos.stride(1)) if pos is not None else (0, 0)

    def call() -> None:
        kernel[grid](
            q, k, q_out, k_out, cos, sin, pos_arg,
            seq, heads_q, heads_k, head_dim // 2, cos.shape[0], 1, grid_order,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), sin.stride(0),
            0, 0,  # one table shared by every sequence
            pos_strides[0], pos_strides[1],
            BLOCK_D2=block_d2, BLOCK_H=shape.block_h, HAS_POS=pos is not None, EVEN_D=even_d,
            num_warps=shape.num_warps)

    return call


def tune_workload(workload: Workload, shapes: List[Shape], kernel: Any, block_d2: int, timer: Any,
                  ours: Optional[Any], log: Callable[[str], None]) -> Dict[str, Any]:
    device = timer.device
    inputs = make_inputs(workload, device)
    q_out = torch.empty_like(inputs.q.detach())
    k_out = torch.empty_like(inputs.k.detach())
    cos_half, sin_half = inputs.reference_angles()
    source = torch.randn(inputs.q.numel() + inputs.k.numel(), dtype=workload.dtype, device=device)
    target = torch.empty_like(source)
    figures = [Figure("floor", lambda: target.copy_(source))]
    record: Dict[str, Any] = {"shape": workload.describe(), "block_d2": block_d2, "results": {},
                              "element_size": inputs.q.element_size(),
                              "heads_fastest": launcher_heads_fastest(inputs.q),
                              "narrow": SPECS.is_narrow_grid(workload.batch * workload.seq,
                                                             workload.heads_q + workload.heads_k)}

    calls: Dict[str, Callable[[], None]] = {}
    if ours is not None:
        q, k = inputs.q.detach(), inputs.k.detach()
        calls["ours"] = lambda: ours(q, k, inputs.table_cos, inputs.table_sin, inputs.positions)
    for shape in shapes:
        call = launcher(kernel, inputs, q_out, k_out, block_d2, shape, record["narrow"])
        q_out.fill_(float("nan"))
        k_out.fill_(float("nan"))
        call()
        check = check_rotation("q", q_out, inputs.q, cos_half, sin_half, False).combined(
            check_rotation("k", k_out, inputs.k, cos_half, sin_half, False))
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
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="all", help="comma-separated names (default: all)")
    parser.add_argument("--block-h", default="1,2,4,8,16,32,64", help="heads per program to try")
    parser.add_argument("--warps", default="1,2,4,8,16", help="warps per program to try")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    kernel = specialized_like_aot(getattr(load_source_module(KERNEL_PATH, "rope_kernel"), SPECS.KERNEL_NAME), SPECS)
    try:
        import_rope_kernels()
        ours: Optional[Any] = torch.ops.rope.fused_qk
    except Exception as error:  # noqa: BLE001  (the kernels can be tuned before the library builds)
        print("rope_kernels not importable, 'ours' left out: {}".format(error))
        ours = None

    device = torch.device("cuda", torch.cuda.current_device())
    timer = make_timer(device, QUICK if args.quick else FULL)
    names = [w.name for w in WORKLOADS] if args.workloads == "all" else args.workloads.split(",")
    block_hs = [int(x) for x in args.block_h.split(",")]
    warps = [int(x) for x in args.warps.split(",")]
    capability = torch.cuda.get_device_capability(device)
    print("{} (sm_{}{}), torch {}".format(torch.cuda.get_device_name(device), *capability, torch.__version__))

    records: Dict[str, Dict[str, Any]] = {}
    for name in names:
        workload = workload_by_name(name)
        block_d2 = SPECS.BLOCK_D2_VALUES[SPECS.block_d2_index_of(workload.head_dim // 2)]
        shapes = candidate_shapes(block_d2, block_hs, warps)
        record = tune_workload(workload, shapes, kernel, block_d2, timer, ours, print)
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
