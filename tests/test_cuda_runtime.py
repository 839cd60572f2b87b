"""The CUDA launcher in the situations real programs put it in: CUDA graph capture and replay,
non-default streams, first calls from a new thread or inside a capture, concurrent threads,
and a second GPU. The first-call cases run in fresh processes, where nothing is loaded yet."""
from __future__ import annotations

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import requires_cuda, requires_two_gpus, run_fresh_python
from rope_kernels.testing import RopeArgs, RopeCase, assert_close_to_reference, make_args, reference_fused_qk

pytestmark = requires_cuda

CASE = RopeCase(batch=2, heads_q=8, heads_k=2, seq=33, head_dim=128, dtype=torch.bfloat16, layout="bshd",
                positions="bs:int64")


def assert_matches_reference(outputs: tuple[torch.Tensor, torch.Tensor], args: RopeArgs, case: RopeCase) -> None:
    for out, ref in zip(outputs, reference_fused_qk(args)):
        assert_close_to_reference(out, ref, case.dtype)


def copy_args(dst: RopeArgs, src: RopeArgs) -> None:
    """Write src's values into dst's tensors in place (dst keeps its memory and layout)."""
    for to, value in zip(dst, src):
        if to is not None:
            to.copy_(value)


def test_graph_capture_and_replay_with_new_inputs() -> None:
    static = make_args(CASE, "cuda")
    # Warm up on a side stream before capturing, as torch.cuda.graphs asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.rope.fused_qk(*static)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.ops.rope.fused_qk(*static)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(outputs, static, CASE)
    first = [out.clone() for out in outputs]

    # New q, k and positions copied into the captured inputs: replay must compute with them.
    copy_args(static, make_args(CASE, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(outputs, static, CASE)
    for out, old in zip(outputs, first):
        assert not torch.equal(out, old), "replay did not pick up the new inputs"


def test_runs_on_the_current_stream() -> None:
    # The inputs are rewritten on a side stream after a long sleep, then the op is called on that
    # stream: only a launch on the current (side) stream is ordered after the rewrite. A launch
    # on any other stream would read the old values and fail the comparison.
    args = make_args(CASE, "cuda")
    new_values = make_args(CASE, "cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # a few hundred milliseconds of GPU time on the side stream
        copy_args(args, new_values)
        outputs = torch.ops.rope.fused_qk(*args)
    side.synchronize()
    assert_matches_reference(outputs, new_values, CASE)


# The first call of a process from a thread that is not the one that set CUDA up: no CUDA
# context is current in that thread until the library (or torch) makes one current.
FIRST_CALL_IN_NEW_THREAD = """
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk
from thread_runner import run_in_threads

case = RopeCase(dtype=torch.float16, layout="qkv", positions="s:int32")
args = make_args(case, "cuda") if MAKE_INPUTS_IN_MAIN_THREAD else None
result = {}

def first_call():
    call_args = args if args is not None else make_args(case, "cuda")
    result["args"] = call_args
    result["outputs"] = torch.ops.rope.fused_qk(*call_args)
    torch.cuda.synchronize()

run_in_threads(first_call, [()])
for out, ref in zip(result["outputs"], reference_fused_qk(result["args"])):
    assert_close_to_reference(out, ref, case.dtype)
print("first call in a new thread: ok")
"""


@pytest.mark.parametrize("inputs_from", ["main_thread", "new_thread"])
def test_first_call_of_a_process_from_a_new_thread(inputs_from: str) -> None:
    flag = "True" if inputs_from == "main_thread" else "False"
    run_fresh_python(f"MAKE_INPUTS_IN_MAIN_THREAD = {flag}\n" + FIRST_CALL_IN_NEW_THREAD)


# The first call of a process inside a CUDA graph capture: nothing may be loaded lazily there
# (module loading is not allowed while capturing), so the library must be ready before.
FIRST_CALL_IN_CAPTURE = """
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk

case = RopeCase(dtype=torch.bfloat16, layout="bshd", positions="bs:int64", head_dim=256)
args = make_args(case, "cuda")
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    outputs = torch.ops.rope.fused_qk(*args)
graph.replay()
torch.cuda.synchronize()
for out, ref in zip(outputs, reference_fused_qk(args)):
    assert_close_to_reference(out, ref, case.dtype)
print("first call inside a capture: ok")
"""


def test_first_call_of_a_process_inside_graph_capture() -> None:
    run_fresh_python(FIRST_CALL_IN_CAPTURE)


# Two threads make their first calls at the same moment (racing any lazy setup), then keep
# calling on their own streams with different kernel variants; every result must be right.
CONCURRENT_THREADS = """
import threading
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk
from thread_runner import run_in_threads

cases = [RopeCase(dtype=torch.bfloat16, layout="bshd", positions="bs:int64", head_dim=128),
         RopeCase(dtype=torch.float16, layout="qkv", head_dim=64, heads_q=16, heads_k=4)]
work = [(case, make_args(case, "cuda")) for case in cases]
expected = [reference_fused_qk(args) for _, args in work]
torch.cuda.synchronize()
start = threading.Barrier(len(work))

def calls(index):
    case, args = work[index]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        start.wait()
        for _ in range(50):
            outputs = torch.ops.rope.fused_qk(*args)
            stream.synchronize()
            for out, ref in zip(outputs, expected[index]):
                assert_close_to_reference(out, ref, case.dtype)

run_in_threads(calls, [(i,) for i in range(len(work))])
print("concurrent threads: ok")
"""


def test_two_threads_call_concurrently() -> None:
    run_fresh_python(CONCURRENT_THREADS)


@requires_two_gpus
def test_second_gpu() -> None:
    # Modules are per device: a call on cuda:1 after one on cuda:0, while cuda:0 is the current
    # device, must launch on cuda:1 with cuda:1's module.
    torch.cuda.set_device(0)
    for device in ["cuda:0", "cuda:1", "cuda:0"]:
        args = make_args(CASE, device)
        outputs = torch.ops.rope.fused_qk(*args)
        assert all(out.device == torch.device(device) for out in outputs)
        assert_matches_reference(outputs, args, CASE)
