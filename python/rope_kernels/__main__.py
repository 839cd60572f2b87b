"""`python -m rope_kernels`: what was built, whether it computes correctly here, and how fast.

1. the build: versions it was compiled with, GPU architectures and kernels it carries, and what is
   running now (a wheel built against another torch or for another GPU shows up here first);
2. a self-check of forward and backward against a float64 reference on every device present;
3. on a GPU, a benchmark of a few seconds against eager PyTorch.

Exit status: 0 when the self-check passes, 1 when it fails, 2 for bad arguments.
"""

import argparse
import platform
import random
import sys
from typing import Any, Dict, List, Optional

import torch

import rope_kernels
from rope_kernels.quick_benchmark import run_benchmark
from rope_kernels.selfcheck import run_self_check

# build_info() keys printed on their own lines; anything else it returns is listed after them.
KNOWN_BUILD_KEYS: List[str] = ["version", "torch", "triton", "cuda", "architectures",
                               "variants_per_architecture", "kernels"]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rope_kernels",
        description="Show how rope_kernels was built, self-check it on every device, "
                    "and benchmark it briefly on a GPU.")
    parser.add_argument("--no-bench", action="store_true", help="skip the GPU benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="check only this kind of device (default: cpu and every CUDA device)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the self-check's random inputs (default: a fresh one, printed)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args


def text_or_none(value: Any) -> str:
    """A build_info value as text; a CPU-only build has no Triton or CUDA version."""
    return "none" if value is None or value == "" else str(value)


def build_info_lines(info: Dict[str, Any]) -> List[str]:
    """build_info() as readable lines."""
    archs = [int(a) for a in (info.get("architectures") or [])]
    if archs:
        arch_text = "{} ({} kernel variants each, {} kernels in all)".format(
            ", ".join("sm_{}".format(a) for a in archs),
            text_or_none(info.get("variants_per_architecture")), text_or_none(info.get("kernels")))
    else:
        arch_text = "none (CPU-only build)"
    lines = [
        "rope_kernels {}".format(text_or_none(info.get("version"))),
        "  built with:        torch {}, triton {}, CUDA {}".format(
            text_or_none(info.get("torch")), text_or_none(info.get("triton")),
            text_or_none(info.get("cuda"))),
        "  GPU architectures: {}".format(arch_text),
    ]
    for key in sorted(k for k in info if k not in KNOWN_BUILD_KEYS):
        lines.append("  {}: {}".format(key, info[key]))
    return lines


def runtime_lines() -> List[str]:
    """The torch and Python running now, and the devices they see."""
    lines = ["  running with:      torch {} (CUDA {}), Python {}".format(
        torch.__version__, text_or_none(torch.version.cuda), platform.python_version())]
    if not torch.cuda.is_available():
        lines.append("  CUDA devices:      none")
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        lines.append("  cuda:{}:            {} (sm_{}{})".format(
            index, torch.cuda.get_device_name(index), major, minor))
    return lines


def devices_to_check(kind: Optional[str]) -> List[torch.device]:
    """cpu and every CUDA device, or only the kind asked for."""
    devices: List[torch.device] = []
    if kind in (None, "cpu"):
        devices.append(torch.device("cpu"))
    if kind in (None, "cuda") and torch.cuda.is_available():
        devices.extend(torch.device("cuda", i) for i in range(torch.cuda.device_count()))
    return devices


def benchmark_skip_reason(args: argparse.Namespace, devices: List[torch.device]) -> Optional[str]:
    """Why the benchmark does not run, or None when it does."""
    if args.no_bench:
        return "--no-bench given"
    if not torch.cuda.is_available():
        return "no GPU is present"
    if not any(d.type == "cuda" for d in devices):
        return "--device cpu given (the benchmark runs on a GPU only)"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    for line in build_info_lines(rope_kernels.build_info()) + runtime_lines():
        print(line)

    # A fresh seed each run explores new inputs; printing it makes a failure reproducible.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    devices = devices_to_check(args.device)
    print()
    print("self-check: torch.ops.rope.fused_qk vs a float64 reference (seed {})".format(seed))
    print("  fwd/bwd = worst error / error allowed by one rounding to the output dtype after fp32 math;")
    print("  <= 1 passes (correct fp16/bf16 results reach about 1.00); inf: a NaN or inf misplaced")
    passed = True
    for device in devices:
        passed = run_self_check(device, seed) and passed
    print("self-check passed" if passed else "self-check FAILED")

    print()
    reason = benchmark_skip_reason(args, devices)
    if reason is None and not passed:
        reason = "the self-check failed (times of wrong results mean nothing)"
    if reason is not None:
        print("benchmark skipped: {}".format(reason))
    else:
        run_benchmark(next(d for d in devices if d.type == "cuda"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
