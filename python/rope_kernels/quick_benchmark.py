"""A few seconds of benchmark on the GPU: torch.ops.rope.fused_qk against eager PyTorch.

RoPE moves bytes and does almost no arithmetic, so every time is also shown over the "copy floor":
the time of a plain `dst.copy_(src)` of as many bytes as q and k hold, measured the same way in the
same run (1.00x = as fast as the memory system allows). The GPU clock, the host and whatever else
shares the machine move absolute times from run to run; the ratios move much less.

Times are medians of CUDA-event intervals around single calls, with the L2 cache flushed before
each call outside the interval: most of these workloads fit in the L2 of a large GPU, and without
the flush a kernel would look faster than memory allows. Host overhead (Python, dispatch, autograd)
falls inside the interval, as it does in a user's step.
"""

import statistics
from typing import Callable, List, Tuple

import torch

from .testing import Workload, cos_sin_tables, random_heads, workload_by_name

# Larger than the L2 cache of any current GPU (60 MB on an H200), so zeroing it evicts q and k.
FLUSH_BYTES: int = 256 * 1024 * 1024

# Time spent measuring each figure; 5 figures per workload keep the whole run to a few seconds.
SECONDS_PER_FIGURE: float = 0.15
MIN_CALLS: int = 10
MAX_CALLS: int = 500
WARMUP_CALLS: int = 3


# Three rows of the project's workload table (rope_kernels.testing.WORKLOADS): the main training
# shape, small heads, and a launch-bound prefill where host overhead dominates.
WORKLOAD_NAMES: Tuple[str, ...] = ("llama8b-train", "hd64-mha", "small-prefill")
WORKLOADS: List[Workload] = [workload_by_name(name) for name in WORKLOAD_NAMES]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's apply_rotary_pos_emb: cos/sin (B, S, D), already gathered by position."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def median_call_us(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """Median microseconds of one call of fn, with the L2 cache flushed before each call."""
    for _ in range(WARMUP_CALLS):  # first calls load kernels and fill the caching allocator
        fn()
    # A rough per-call time sizes the number of calls to the time budget.
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(WARMUP_CALLS):
        flush.zero_()
        fn()
    end.record()
    end.synchronize()
    per_call_ms = max(start.elapsed_time(end) / WARMUP_CALLS, 1e-3)
    calls = int(min(MAX_CALLS, max(MIN_CALLS, SECONDS_PER_FIGURE * 1000.0 / per_call_ms)))

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for i in range(calls):
        flush.zero_()  # outside the interval: only fn is timed
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median([s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure_workload(w: Workload, device: torch.device, flush: torch.Tensor) -> List[float]:
    """[floor, ours fwd, eager fwd, ours fwd+bwd, eager fwd+bwd] in microseconds."""
    op = torch.ops.rope.fused_qk
    # Inputs as a training step has them: projection outputs viewed as (B, H, S, D), needing grad.
    # (the layout of the workload: "bshd" for these rows), drawn on the GPU as they are large.
    q = random_heads(w.layout, w.batch, w.heads_q, w.seq, w.head_dim, w.dtype, device,
                     draw_on_device=True).requires_grad_()
    k = random_heads(w.layout, w.batch, w.heads_k, w.seq, w.head_dim, w.dtype, device,
                     draw_on_device=True).requires_grad_()
    grad_q = torch.randn_like(q)
    grad_k = torch.randn_like(k)
    # The Hugging Face full-width table in q's dtype, which both candidates take. Eager gets it
    # gathered per token once up front, as HF models do once per step for all layers.
    cos, sin = cos_sin_tables(w.seq, w.head_dim, full_width=True, dtype=w.dtype, device=device)
    position_ids = torch.arange(w.seq, device=device).expand(w.batch, w.seq)
    cos_tokens, sin_tokens = cos[position_ids], sin[position_ids]

    # The floor: one copy over as many bytes as q and k (read once, written once).
    src = torch.empty(q.numel() + k.numel(), device=device, dtype=w.dtype)
    dst = torch.empty_like(src)

    def copy_floor() -> None:
        dst.copy_(src)

    def ours_forward() -> None:
        op(q, k, cos, sin)

    def eager_forward() -> None:
        eager_rope(q, k, cos_tokens, sin_tokens)

    def ours_forward_backward() -> None:
        q_out, k_out = op(q, k, cos, sin)
        torch.autograd.grad([q_out, k_out], [q, k], [grad_q, grad_k])

    def eager_forward_backward() -> None:
        q_out, k_out = eager_rope(q, k, cos_tokens, sin_tokens)
        torch.autograd.grad([q_out, k_out], [q, k], [grad_q, grad_k])

    figures = [copy_floor, ours_forward, eager_forward, ours_forward_backward, eager_forward_backward]
    return [median_call_us(fn, flush) for fn in figures]


def format_figure(us: float, floor_us: float) -> str:
    """Microseconds and their ratio to a floor, in a fixed width."""
    return "{:9.1f} {:6.2f}x".format(us, us / floor_us)


def run_benchmark(device: torch.device) -> None:
    """Measures every workload on device (a CUDA device) and prints one row each."""
    with torch.cuda.device(device):
        print("benchmark on {} ({}): median of CUDA-event times per call, L2 flushed before each call,"
              .format(device, torch.cuda.get_device_name(device)))
        print("host overhead included; q, k: transposed (B,S,H,D) views needing grad, as in training")
        print("x = time / copy floor (forward+backward: / twice the floor, as it passes over q and k twice)")
        header = "{:<14} {:>9} | {:^17} {:^17} | {:^17} {:^17}".format(
            "workload", "floor us", "fused_qk fwd", "eager fwd", "fused_qk fwd+bwd", "eager fwd+bwd")
        print(header)
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
        for w in WORKLOADS:
            floor, ours_f, eager_f, ours_fb, eager_fb = measure_workload(w, device, flush)
            print("{:<14} {:9.1f} | {} {} | {} {}".format(
                w.name, floor, format_figure(ours_f, floor), format_figure(eager_f, floor),
                format_figure(ours_fb, 2 * floor), format_figure(eager_fb, 2 * floor)))
        del flush
        torch.cuda.empty_cache()  # hand the benchmark's memory back before the process goes on
