"""Trains TinyLlama under DistributedDataParallel and checks its loss curve against one device's.

    torchrun --nproc-per-node 2 tests/distributed/ddp_train.py --backend nccl   # a GPU per process
    torchrun --nproc-per-node 2 tests/distributed/ddp_train.py --backend gloo   # CPU processes

Each process trains on its slice of every step's global batch and DDP averages the gradients, so
the model takes the same steps as one device training on the whole batch. After the DDP run,
rank 0 trains that single-device model (same initial weights, same data, on its own device) and
compares the two loss curves step by step. Exit status 0 when they agree within the tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# NVLink multicast stays off: it must be decided before NCCL creates a communicator.
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llama import TinyLlama, TinyLlamaConfig, synthetic_batch  # noqa: E402

CONFIG = TinyLlamaConfig()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["nccl", "gloo"], required=True,
                        help="nccl: one GPU per process (cuda:LOCAL_RANK); gloo: CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step, over all processes")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    # fp32 everywhere: the curves differ only by the order of the gradient sums (~1e-6 relative
    # a step); a rank that skipped the averaging or rotated wrongly is off by far more.
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--out", default=None, help="write both loss curves to this JSON file (rank 0)")
    return parser.parse_args(argv)


def train(device: torch.device, rows: slice, args: argparse.Namespace, ddp: bool) -> List[float]:
    """Loss of each step (before its update) of the mean over the whole global batch."""
    torch.manual_seed(0)  # the same initial weights in every process and in the single run
    model: torch.nn.Module = TinyLlama(CONFIG).to(device)
    if ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for step in range(args.steps):
        tokens, targets, positions = (t[rows].to(device) for t in
                                      synthetic_batch(step, args.global_batch, args.seq, CONFIG))
        logits = model(tokens, positions)
        loss = F.cross_entropy(logits.reshape(-1, CONFIG.vocab), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.detach().clone()
        if ddp:
            # Equal slices: the mean of the processes' means is the mean over the global batch.
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(value.item())
    return losses


def compare(ddp: List[float], single: List[float]) -> float:
    """Prints the curves side by side; returns the largest relative difference."""
    print(f"{'step':>4}  {'ddp loss':>12}  {'single loss':>12}  {'rel. diff':>9}")
    worst = 0.0
    for step, (a, b) in enumerate(zip(ddp, single)):
        diff = abs(a - b) / abs(b)
        worst = max(worst, diff)
        print(f"{step:>4}  {a:>12.6f}  {b:>12.6f}  {diff:>9.2e}")
    return worst


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        print("run under torchrun (torchrun --nproc-per-node 2 ...)", file=sys.stderr)
        return 2
    # Matmuls in true fp32 on every GPU: TF32 would make the comparison meaningless.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.global_batch % world:
        print(f"--global-batch {args.global_batch} is not divisible by {world} processes", file=sys.stderr)
        return 2
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # The device named up front: NCCL then binds this rank's GPU at once, and collectives such as
    # the barrier below do not have to guess it from the current device.
    dist.init_process_group(args.backend, device_id=device if device.type == "cuda" else None)
    local = args.global_batch // world
    ddp_losses = train(device, slice(rank * local, (rank + 1) * local), args, ddp=True)
    # Both ranks finish every collective before the teardown: a rank that tears gloo down while
    # its peer is still using the connection can be aborted (seen once in CI).
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return 0

    single_losses = train(device, slice(None), args, ddp=False)
    worst = compare(ddp_losses, single_losses)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ddp": ddp_losses, "single": single_losses, "max_rel_diff": worst,
                       "world_size": world, "backend": args.backend}, f)
    learned = single_losses[-1] < 0.8 * single_losses[0]
    agree = worst <= args.rtol
    print(f"DDP ({world} x {device.type}, {args.backend}) vs one device: {args.steps} steps, "
          f"loss {single_losses[0]:.3f} -> {single_losses[-1]:.3f}, "
          f"max relative difference {worst:.2e} (tolerance {args.rtol:.0e}): "
          f"{'ok' if agree and learned else 'FAILED'}")
    if not learned:
        print("the single-device run did not learn (final loss not below 80% of the first)", file=sys.stderr)
    return 0 if agree and learned else 1


if __name__ == "__main__":
    sys.exit(main())
