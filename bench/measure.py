"""One workload, every candidate: check each against the reference, then take its figures.

Forward figures run with autograd recording (a training step's forward; the forward-only
candidates record nothing); backward figures are the gradient of q and k alone,
`torch.autograd.grad` on one retained graph. Host and CUDA-graph
figures run the forward without grad (inference, decoding). A candidate that lacks a feature of
the workload (interleaved pairs, partial rotary, a head size) is reported unavailable for it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .candidates import DIRECTIONS, BoundCall, Candidate
from .check import check_convention
from .timing import Figure, Measured, Timer
from .workloads import Inputs, Workload, make_inputs

# After .workloads, which finds rope_kernels (installed, or built in place in python/).
from rope_kernels.testing import CheckResult  # noqa: E402

# Host time of a call whose wall time is unknown: sizes the loop only.
DEFAULT_ESTIMATE_US: float = 100.0

# The record keys (and profile figures) of the references beside the floor: q and k copied into
# tensors allocated beforehand, and cloned (the copy into fresh tensors, as an out-of-place op
# returns them: on the CPU the fresh memory's first touch costs as much as the copy itself).
COPY_QK: str = "copy_qk"
CLONE_QK: str = "clone_qk"
REFERENCES: Tuple[Tuple[str, str], ...] = ((COPY_QK, "copy of q and k"), (CLONE_QK, "clone of q and k"))


@dataclasses.dataclass
class Prepared:
    candidate: Candidate
    inputs: Inputs
    forward: BoundCall
    backward: Optional[Callable[[], Any]]  # None for a forward-only candidate


def error_text(error: BaseException) -> str:
    text = "{}: {}".format(type(error).__name__, error)
    return text if len(text) < 400 else text[:400] + "..."


def _poison_allocator(device: torch.device, like: Sequence[torch.Tensor]) -> None:
    """Free NaN-filled blocks of the outputs' sizes just before a call: the caching allocator
    hands them to the call's outputs, so an element a candidate forgets to write reads NaN
    instead of a stale, possibly correct, value. Best effort: a miss only weakens the check."""
    blocks = [torch.full((t.numel(),), math.nan, dtype=t.dtype, device=device) for t in like]
    del blocks


def check_candidate(candidate: Candidate, workload: Workload, pristine: Inputs, timer: Timer,
                    entry: Dict[str, Any]) -> Optional[Prepared]:
    """One forward and one backward (where the candidate has one) on fresh copies of the inputs,
    each checked against the float64 reference in the workload's conventions; the calls to time
    when all pass, None otherwise (entry says why)."""
    candidate.prepare(workload)
    inputs = pristine.clone()
    forward = candidate.bind(inputs)

    def check(names: Tuple[str, str], results: Sequence[torch.Tensor], sources: Tuple[torch.Tensor, torch.Tensor],
              inverse: bool) -> CheckResult:
        q_out, k_out = (candidate.as_heads(result, inputs) for result in results)
        return check_convention(names[0], q_out, sources[0], pristine, inverse).combined(
            check_convention(names[1], k_out, sources[1], pristine, inverse))

    _poison_allocator(timer.device, (pristine.q, pristine.k))
    timer.synchronize()
    start = time.perf_counter()
    outputs = forward()
    timer.synchronize()
    forward_s = time.perf_counter() - start
    forward_check = check(("q_out", "k_out"), outputs, (pristine.q, pristine.k), False)

    if "backward" not in candidate.directions:
        entry["first_call_s"] = {"forward": forward_s}
        entry["check"] = {"forward": forward_check.to_json()}
        if not forward_check.passed:
            entry["status"] = "failed check"
            entry["error"] = forward_check.message
            return None
        return Prepared(candidate, inputs, forward, None)

    q, k, grad_q, grad_k = candidate.grad_targets(inputs)
    _poison_allocator(timer.device, (pristine.q, pristine.k))
    start = time.perf_counter()
    grads = torch.autograd.grad(outputs, (q, k), (grad_q, grad_k), retain_graph=True)
    timer.synchronize()
    backward_s = time.perf_counter() - start
    backward_check = check(("grad_q", "grad_k"), grads, (pristine.grad_q, pristine.grad_k), True)
    del grads

    # The first calls include whatever is compiled or loaded on first use (Triton JIT, Inductor).
    entry["first_call_s"] = {"forward": forward_s, "backward": backward_s}
    entry["check"] = {"forward": forward_check.to_json(), "backward": backward_check.to_json()}
    if not (forward_check.passed and backward_check.passed):
        entry["status"] = "failed check"
        entry["error"] = "; ".join(m for m in (forward_check.message, backward_check.message) if m)
        return None

    def backward() -> Any:
        return torch.autograd.grad(outputs, (q, k), (grad_q, grad_k), retain_graph=True)

    return Prepared(candidate, inputs, forward, backward)


def _value(measured: Optional[Measured]) -> Optional[float]:
    return measured if isinstance(measured, float) else None


def figure_entry(kernel: Optional[Measured], wall: Optional[Measured], floor_kernel: Optional[float],
                 floor_wall: Optional[float], bytes_moved: int) -> Dict[str, Any]:
    """µs, ratio to the copy floor measured the same way, and achieved GB/s, for both times."""
    entry: Dict[str, Any] = {}
    for name, measured, floor in (("kernel", kernel, floor_kernel), ("wall", wall, floor_wall)):
        us = _value(measured)
        entry[name + "_us"] = us
        entry[name + "_x"] = us / floor if us and floor else None
        entry[name + "_gbps"] = bytes_moved / (us * 1e3) if us else None
        if isinstance(measured, str):
            entry[name + "_error"] = measured
    return entry


def _safe(fn: Callable[[], Optional[float]]) -> Measured:
    try:
        value = fn()
        return "not measured" if value is None else float(value)
    except Exception as error:  # noqa: BLE001  (one figure failing must not lose the others)
        return error_text(error)


def _store(entry: Dict[str, Any], name: str, measured: Measured) -> None:
    if isinstance(measured, float):
        entry[name] = measured
    else:
        entry[name] = None
        entry[name + "_error"] = measured


def measure_workload(workload: Workload, candidates: List[Tuple[Candidate, Optional[str]]], timer: Timer,
                     log: Callable[[str], None]) -> Dict[str, Any]:
    """Every figure of one workload. candidates: (candidate, why it is unavailable or None)."""
    device = timer.device
    record: Dict[str, Any] = {
        "name": workload.name, "shape": workload.describe(), "note": workload.note,
        "dtype": str(workload.dtype).replace("torch.", ""), "layout": workload.layout,
        "decode": workload.decode, "bytes": workload.bytes_moved,
        "rotary_dim": workload.rotary, "interleaved": workload.interleaved, "op_layout": workload.op_layout,
        "documents": workload.document_lengths(), "candidates": {}}
    pristine = make_inputs(workload, device)

    # The floor: one plain copy of as many bytes as q and k hold (read once, written once).
    source = torch.randn(pristine.q.numel() + pristine.k.numel(), dtype=workload.dtype, device=device)
    target = torch.empty_like(source)
    # A reference beside it, not a candidate: torch copying q and k themselves, into tensors laid
    # out as they are (two copies, the same bytes as the floor). It shows what the memory system
    # gives on these very tensors (two of them, strided views) as against one flat buffer.
    q_source, k_source = pristine.q.detach(), pristine.k.detach()
    q_target, k_target = torch.empty_like(q_source), torch.empty_like(k_source)
    figures = [Figure("floor", lambda: target.copy_(source)),
               Figure(COPY_QK, lambda: (q_target.copy_(q_source), k_target.copy_(k_source))),
               Figure(CLONE_QK, lambda: (q_source.clone(), k_source.clone()))]

    prepared: List[Prepared] = []
    for candidate, unavailable in candidates:
        entry: Dict[str, Any] = {"label": candidate.label}
        record["candidates"][candidate.key] = entry
        if unavailable is not None:
            entry["status"] = "unavailable"
            entry["error"] = unavailable
            continue
        lacks = candidate.unsupported(workload)
        if lacks is not None:
            entry["status"] = "unavailable"
            entry["error"] = lacks
            log("  {:<14} n/a: {}".format(candidate.label, lacks))
            continue
        try:
            ready = check_candidate(candidate, workload, pristine, timer, entry)
        except Exception as error:  # noqa: BLE001
            entry["status"] = "error"
            entry["error"] = error_text(error)
            log("  {:<14} error: {}".format(candidate.label, entry["error"]))
            continue
        if ready is None:
            log("  {:<14} FAILED the check, not timed: {}".format(candidate.label, entry["error"]))
            continue
        entry["status"] = "ok"
        checked = [d for d in DIRECTIONS if d in entry["check"]]
        log("  {:<14} check passed (worst error {} of the allowance); first call {}".format(
            candidate.label, " / ".join("{:.2f}".format(entry["check"][d]["worst_ratio"]) for d in checked),
            " / ".join("{:.3f} s".format(entry["first_call_s"][d]) for d in checked)))
        prepared.append(ready)
        figures.append(Figure(candidate.key + "/forward", ready.forward))
        if ready.backward is not None:
            figures.append(Figure(candidate.key + "/backward", ready.backward))

    try:
        kernel = timer.kernel_times(figures)
    except Exception as error:  # noqa: BLE001  (the profiler failed: the other times remain)
        kernel = {figure.key: error_text(error) for figure in figures}
    wall: Dict[str, Measured] = {}
    for figure in figures:
        wall[figure.key] = _safe(functools.partial(timer.wall_us, figure.fn))
    floor_kernel, floor_wall = _value(kernel.get("floor")), _value(wall["floor"])
    record["floor"] = figure_entry(kernel.get("floor"), wall["floor"], None, None, workload.bytes_moved)
    for reference, _ in REFERENCES:
        record[reference] = figure_entry(kernel.get(reference), wall[reference], floor_kernel, floor_wall,
                                         workload.bytes_moved)
    for done in prepared:
        entry = record["candidates"][done.candidate.key]
        for direction in done.candidate.directions:
            key = done.candidate.key + "/" + direction
            entry[direction] = figure_entry(kernel.get(key), wall[key], floor_kernel, floor_wall,
                                            workload.bytes_moved)

    with torch.no_grad():
        q = pristine.q
        _store(record, "host_us_torch_add",
               _safe(lambda: timer.host_us(lambda: torch.add(q, q), floor_wall or DEFAULT_ESTIMATE_US)))
        for done in prepared:
            entry = record["candidates"][done.candidate.key]
            estimate = entry["forward"]["wall_us"] or DEFAULT_ESTIMATE_US
            _store(entry, "host_us", _safe(lambda: timer.host_us(done.forward, estimate)))
        if workload.decode and timer.kind == "cuda":
            # The copy of the same bytes in a graph: what the decode rows' graph times compare to.
            _store(record["floor"], "graph_us", _safe(lambda: timer.graph_us(figures[0].fn)))
            for done in prepared:  # last: a failed capture must not disturb the other figures
                _store(record["candidates"][done.candidate.key], "graph_us",
                       _safe(lambda: timer.graph_us(done.forward)))
    for done in prepared:
        try:
            record["candidates"][done.candidate.key].update(done.candidate.details())
        except Exception as error:  # noqa: BLE001
            record["candidates"][done.candidate.key]["details_error"] = error_text(error)
    return record
