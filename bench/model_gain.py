"""The gain of the fused RoPE op inside a real model, with and without `patch_transformers()`.

Models from transformers (random weights, no download) at real sizes, hidden 4096, 32 query / 8
key-value heads of dim 128, MLP 14336, a few layers, bfloat16, of each family asked for (`--families`):
Llama; Qwen3 (q and k normalized before RoPE); Phi-3 with Phi-4-mini's partial rotary factor 0.75
(RoPE on 96 of 128 features, the op's `rotary_dim`). Measured, per family:

1. a training step: forward and backward of a (batch, seq) batch with labels;
2. decoding with the KV cache: tokens per second after the prompt, for a few batch sizes;
3. RoPE alone, forward and backward, for one layer's q and k (what the patch replaces).

Each measurement alternates unpatched and patched runs and keeps each side's best median, so a
clock or thermal drift does not favour either. Prints a Markdown table.

    python bench/model_gain.py                 # on a GPU: about a minute per family on an H200
    python bench/model_gain.py --device cpu --tiny   # a seconds-long smoke run of the script itself
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import torch

import rope_kernels

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Family name -> (transformers model_type, config fields beyond the sizes, fraction of head_dim rotated).
FAMILIES = {
    "llama": ("llama", {}, 1.0),
    "qwen3": ("qwen3", {}, 1.0),
    "phi3-partial": ("phi3", {"partial_rotary_factor": 0.75}, 0.75),
}


@dataclass
class Sizes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    decode_batches: List[int]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1, help="training batch size")
    p.add_argument("--seq", type=int, default=4096, help="training sequence length")
    p.add_argument("--prompt", type=int, default=512, help="decoding: prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="decoding: tokens generated per run")
    p.add_argument("--decode-batches", type=str, default="1,16", help="decoding batch sizes, comma separated")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating unpatched/patched rounds")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma separated, of: " + ", ".join(FAMILIES))
    p.add_argument("--tiny", action="store_true", help="small sizes, to check the script itself")
    return p.parse_args()


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.tiny:
        return Sizes(layers=2, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512, batch=1, seq=128,
                     prompt=16, new_tokens=8, decode_batches=[1, 4])
    return Sizes(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab, args.batch,
                 args.seq, args.prompt, args.new_tokens, [int(b) for b in args.decode_batches.split(",")])


def build_model(s: Sizes, family: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra, _ = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=s.vocab, hidden_size=s.hidden,
                                  intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                                  num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                                  head_dim=s.hidden // s.heads,
                                  max_position_embeddings=max(s.seq, s.prompt + s.new_tokens) + 16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 1B parameters
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    return model


class Timer:
    """Seconds of GPU work between start() and stop() (CUDA events), or wall time on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn: Callable[[], object], repeats: int) -> List[float]:
        times = []
        for _ in range(repeats):
            self.sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times


@contextlib.contextmanager
def patched(on: bool, family: str) -> Iterator[None]:
    if not on:
        yield
        return
    with rope_kernels.patch_transformers(FAMILIES[family][0]):
        yield


def best_of_rounds(rounds: int, run: Callable[[bool], float]) -> Tuple[float, float]:
    """(unpatched, patched): each side's best result over alternating rounds (lower is better)."""
    base, fused = [], []
    for _ in range(rounds):
        base.append(run(False))
        fused.append(run(True))
    return min(base), min(fused)


def training_step_seconds(model: torch.nn.Module, family: str, s: Sizes, timer: Timer, iters: int,
                          device: str) -> Callable[[bool], float]:
    """Median seconds of one forward+backward with labels, unpatched (False) or patched (True)."""
    ids = torch.randint(3, s.vocab, (s.batch, s.seq), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def run(patch: bool) -> float:
        with patched(patch, family):
            step()  # warm-up (first call after a switch)
            return statistics.median(timer.measure(step, iters))

    return run


def decode_seconds_per_token(model: torch.nn.Module, family: str, s: Sizes, batch: int, timer: Timer,
                             device: str) -> Callable[[bool], float]:
    """Time per generated token after the prefill: (t(prompt + n tokens) - t(prompt + 1 token)) / (n - 1)."""
    ids = torch.randint(3, s.vocab, (batch, s.prompt), device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0)

    def run(patch: bool) -> float:
        with patched(patch, family):
            generate(2)  # warm-up
            full = min(timer.measure(lambda: generate(s.new_tokens), 2))
            prefill = min(timer.measure(lambda: generate(1), 2))
        return (full - prefill) / (s.new_tokens - 1)

    return run


def rope_alone_seconds(s: Sizes, family: str, dtype: torch.dtype, timer: Timer, device: str,
                       iters: int) -> Callable[[bool], float]:
    """One layer's RoPE, forward and backward, as the attention calls it: q and k transposed views of
    the projections, cos/sin (1, seq, rotated width) in the model dtype; the family's own function
    against the op's drop-in."""
    import importlib

    model_type, _, rotated = FAMILIES[family]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    head_dim = s.hidden // s.heads
    width = int(head_dim * rotated)
    q_proj = torch.randn(s.batch, s.seq, s.heads * head_dim, device=device, dtype=dtype, requires_grad=True)
    k_proj = torch.randn(s.batch, s.seq, s.kv_heads * head_dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.arange(s.seq, device=device, dtype=torch.float32)[:, None] * torch.rand(width // 2, device=device)
    angles = torch.cat((angles, angles), dim=-1)[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad_q = torch.randn(s.batch, s.heads, s.seq, head_dim, device=device, dtype=dtype)
    grad_k = torch.randn(s.batch, s.kv_heads, s.seq, head_dim, device=device, dtype=dtype)

    def step(apply: Callable[..., Tuple[torch.Tensor, torch.Tensor]]) -> None:
        q = q_proj.view(s.batch, s.seq, s.heads, head_dim).transpose(1, 2)
        k = k_proj.view(s.batch, s.seq, s.kv_heads, head_dim).transpose(1, 2)
        q_out, k_out = apply(q, k, cos, sin)
        torch.autograd.backward((q_out, k_out), (grad_q, grad_k))

    original = module.apply_rotary_pos_emb

    def run(patch: bool) -> float:
        apply = rope_kernels.apply_rotary_pos_emb if patch else original
        step(apply)
        return statistics.median(timer.measure(lambda: step(apply), iters))

    return run


def gain(base: float, fused: float) -> str:
    return f"{(base / fused - 1) * 100:+.1f}%"


def family_rows(family: str, s: Sizes, args: argparse.Namespace, timer: Timer) -> List[Tuple[str, ...]]:
    """The measurements of one family, as table rows."""
    dtype, device = DTYPES[args.dtype], args.device
    rows: List[Tuple[str, ...]] = []
    rope_base, rope_fused = best_of_rounds(args.rounds, rope_alone_seconds(s, family, dtype, timer, device,
                                                                           args.iters * 5))
    rows.append((family, f"RoPE of one layer, fwd+bwd, batch {s.batch} x seq {s.seq} (us)", f"{rope_base * 1e6:.1f}",
                 f"{rope_fused * 1e6:.1f}", f"{rope_base / rope_fused:.2f}x"))

    model = build_model(s, family, dtype, device)
    model.train()
    step_base, step_fused = best_of_rounds(args.rounds,
                                           training_step_seconds(model, family, s, timer, args.iters, device))
    rows.append((family, f"training step fwd+bwd, batch {s.batch} x seq {s.seq} (ms)", f"{step_base * 1e3:.1f}",
                 f"{step_fused * 1e3:.1f}", gain(step_base, step_fused) + " steps/s"))
    model.zero_grad(set_to_none=True)

    model.eval()
    for batch in s.decode_batches:
        dec_base, dec_fused = best_of_rounds(args.rounds,
                                             decode_seconds_per_token(model, family, s, batch, timer, device))
        rows.append((family, f"decode with KV cache, batch {batch}, prompt {s.prompt} (tokens/s)",
                     f"{batch / dec_base:.0f}", f"{batch / dec_fused:.0f}", gain(dec_base, dec_fused)))
    del model
    return rows


def main() -> None:
    args = parse_args()
    s = sizes_from(args)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    timer = Timer(args.device)
    import transformers

    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, rope_kernels {rope_kernels.__version__}")
    print(f"models: {', '.join(families)}; {s.layers} layers, hidden {s.hidden}, heads {s.heads}/{s.kv_heads}, "
          f"head_dim {s.hidden // s.heads}, MLP {s.intermediate}, vocab {s.vocab}, {args.dtype}")
    print()
    print("| family | measurement | transformers | patched (rope_kernels) | gain |")
    print("|---|---|---:|---:|---:|")
    # Each family's rows as soon as they are measured: a run cut short keeps what it measured.
    for family in families:
        for row in family_rows(family, s, args, timer):
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
