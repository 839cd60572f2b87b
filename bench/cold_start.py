"""Cold start: import and first call of one candidate in a fresh process, with empty Triton and
Inductor caches, so that whatever a candidate compiles at run time is paid here, as a user's
first step pays it.

The parent runs `python -m bench.cold_start IMPL WORKLOAD DEVICE [--smoke]` once per candidate;
the child creates the CUDA context and the inputs first (every candidate needs those), then
times the candidate's import (load), its first call and a second call, and prints one JSON line.
The parent also counts the files the child left in the caches: an ahead-of-time library
leaves none.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# torch.compile's first call, the slowest, takes about 10 s on an H200.
CHILD_TIMEOUT_S: float = 120.0
RESULT_PREFIX: str = "COLD_START_RESULT "


def _count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) if root.exists() else 0


def run_child(impl: str, workload: str, device: str, smoke: bool) -> Dict[str, Any]:
    start = time.perf_counter()
    import torch

    from .candidates import make_candidate
    from .workloads import make_inputs, workload_by_name

    import_torch_s = time.perf_counter() - start
    chosen = workload_by_name(workload)
    if smoke:
        chosen = chosen.smoke()
    torch_device = torch.device(device)
    if smoke and torch_device.type == "cpu":
        torch.set_num_threads(1)  # as the parent does for smoke runs
    inputs = make_inputs(chosen, torch_device)

    def synchronize() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    synchronize()
    candidate = make_candidate(impl)
    start = time.perf_counter()
    candidate.load(torch_device)
    candidate.prepare(chosen)
    call = candidate.bind(inputs)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        call()
        synchronize()
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        call()
        synchronize()
        second_s = time.perf_counter() - start
    return {"import_torch_ms": 1e3 * import_torch_s, "import_ms": 1e3 * load_s,
            "first_call_ms": 1e3 * first_s, "second_call_ms": 1e3 * second_s,
            "import_and_first_call_ms": 1e3 * (load_s + first_s)}


def measure(impl: str, workload: str, device: str, smoke: bool,
            timeout_s: float = CHILD_TIMEOUT_S) -> Dict[str, Any]:
    """One candidate's cold start, from a fresh interpreter with fresh, empty caches."""
    repo_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="rope-bench-cold-") as scratch:
        caches = Path(scratch)
        env = dict(os.environ)
        env["TRITON_CACHE_DIR"] = str(caches / "triton")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
        paths = [str(repo_root), str(repo_root / "python")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        command = [sys.executable, "-m", "bench.cold_start", impl, workload, device] + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(command, cwd=str(repo_root), env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": "no first call within {:.0f} s".format(timeout_s)}
        results = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not results:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": "exit {}: {}".format(proc.returncode, " | ".join(tail))}
        try:
            result: Dict[str, Any] = json.loads(results[-1])
        except ValueError as error:
            return {"error": "unreadable result {!r}: {}".format(results[-1][:200], error)}
        result["files_compiled"] = _count_files(caches / "triton") + _count_files(caches / "inductor")
        return result


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.cold_start")
    parser.add_argument("impl")
    parser.add_argument("workload")
    parser.add_argument("device")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    result = run_child(args.impl, args.workload, args.device, args.smoke)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
