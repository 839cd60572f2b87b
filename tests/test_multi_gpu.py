"""Two GPUs in one process: the op must use each tensor's own device, whatever the caller's current
device, thread or stream.

The kernels are loaded into each device's context separately; a module loaded into one device's
context and launched on another gives an invalid-handle error or a launch on the wrong GPU. These
tests call the op on cuda:0 and cuda:1 alternately from several threads, with the current device
set to the other GPU, on outputs copied from one GPU to the other, under autograd (whose backward
runs in a thread per device), inside a CUDA graph capture on cuda:1, and for the very first call of
a process (in a fresh process, where nothing is loaded yet).
"""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import requires_two_gpus, run_fresh_python
from rope_kernels.testing import (RopeArgs, RopeCase, assert_close_to_reference, assert_output_layout,
                                  make_args, poison_allocator, reference_fused_qk, reference_grads)

pytestmark = requires_two_gpus

CASE = RopeCase(batch=2, heads_q=8, heads_k=2, seq=33, head_dim=128, dtype=torch.bfloat16, layout="bshd",
                positions="bs:int64")


@pytest.fixture(autouse=True)
def _keep_current_device() -> Iterator[None]:
    """Each test sets the current device as it needs; the next test starts from the same one."""
    before = torch.cuda.current_device()
    yield
    torch.cuda.set_device(before)


def assert_matches_reference(outputs: tuple[torch.Tensor, torch.Tensor], args: RopeArgs, dtype: torch.dtype,
                             inverse: bool = False) -> None:
    for out, x, ref in zip(outputs, (args.q, args.k), reference_fused_qk(args, inverse)):
        assert out.device == x.device, f"output on {out.device}, input on {x.device}"
        assert_output_layout(out, x)
        assert_close_to_reference(out, ref, dtype)


def on_device(args: RopeArgs, device: str) -> RopeArgs:
    """args copied to `device` (GPU to GPU: a peer-to-peer copy); dense layouts keep their strides."""
    return RopeArgs(*(None if t is None else t.to(device) for t in args))


# Several threads, each with its own kernel variant and its own current device, call the op on
# both GPUs in turn, starting at the same moment: the first loads of every variant on both devices
# race each other. A fresh process, so that nothing is loaded before.
ALTERNATING_THREADS = """
import threading
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, poison_allocator, reference_fused_qk
from thread_runner import run_in_threads

cases = [RopeCase(batch=2, heads_q=8, heads_k=2, seq=33, head_dim=128, dtype=torch.bfloat16, layout="bshd",
                  positions="bs:int64"),
         RopeCase(heads_q=16, heads_k=4, head_dim=64, dtype=torch.float16, layout="qkv", positions="s:int32"),
         RopeCase(heads_q=4, heads_k=4, head_dim=256, dtype=torch.float32, layout="padded"),
         RopeCase(heads_q=6, heads_k=1, head_dim=32, dtype=torch.bfloat16, table_dtype="same", table_width="full",
                  positions="sb:int64")]
devices = ["cuda:0", "cuda:1"]
ROUNDS = 20

work = []
for index, case in enumerate(cases):
    per_device = {}
    for device in devices:
        torch.manual_seed(index)  # the same values (and layout) on both GPUs
        per_device[device] = make_args(case, device)
    work.append((case, per_device, reference_fused_qk(per_device["cuda:0"])))
for device in devices:
    torch.cuda.synchronize(device)
start = threading.Barrier(len(work))

def calls(index):
    case, per_device, expected = work[index]
    home = index % 2  # half the calls of every thread go to the GPU that is not its current one
    torch.cuda.set_device(home)
    start.wait()
    for round in range(ROUNDS):
        order = devices if (round + index) % 2 == 0 else devices[::-1]
        outputs = {}
        for device in order:
            args = per_device[device]
            poison_allocator(device, (args.q, args.k))
            outputs[device] = torch.ops.rope.fused_qk(*args)
        for device in order:
            torch.cuda.synchronize(device)
            for out, ref in zip(outputs[device], expected):
                assert out.device == torch.device(device), f"output on {out.device}, expected {device}"
                assert_close_to_reference(out, ref, case.dtype)
        assert torch.cuda.current_device() == home, "the op changed the thread's current device"

run_in_threads(calls, [(i,) for i in range(len(work))])
print("alternating devices from several threads: ok")
"""


def test_both_gpus_alternately_from_several_threads() -> None:
    run_fresh_python(ALTERNATING_THREADS)


@pytest.mark.parametrize(("current", "tensors"), [(0, 1), (1, 0)], ids=["current0-tensors1", "current1-tensors0"])
def test_current_device_differs_from_the_tensors(current: int, tensors: int) -> None:
    torch.cuda.set_device(current)
    device = f"cuda:{tensors}"
    args = make_args(CASE, device)
    poison_allocator(device, (args.q, args.k))
    outputs = torch.ops.rope.fused_qk(*args)
    assert torch.cuda.current_device() == current, "the op did not restore the caller's current device"
    torch.cuda.synchronize(device)
    assert_matches_reference(outputs, args, CASE.dtype)


def test_runs_on_the_current_stream_of_the_tensors_device() -> None:
    # cuda:1's current stream is a side stream that rewrites the inputs after a long sleep, while
    # the caller's current device is cuda:0. Only a launch on cuda:1's current stream is ordered
    # after the rewrite; one on cuda:1's default stream (or anything of cuda:0) reads old values.
    torch.cuda.set_device(0)
    args = make_args(CASE, "cuda:1")
    new_values = make_args(CASE, "cuda:1")
    torch.cuda.synchronize(1)
    side = torch.cuda.Stream(device=1)
    with torch.cuda.device(1):
        previous = torch.cuda.current_stream()
        torch.cuda.set_stream(side)
    try:
        assert torch.cuda.current_device() == 0 and torch.cuda.current_stream(1) == side
        with torch.cuda.device(1):
            torch.cuda._sleep(200_000_000)  # a few hundred milliseconds of GPU time, on `side`
            for to, value in zip(args, new_values):
                if to is not None:
                    to.copy_(value)
        assert torch.cuda.current_device() == 0
        outputs = torch.ops.rope.fused_qk(*args)
        side.synchronize()
    finally:
        with torch.cuda.device(1):
            torch.cuda.set_stream(previous)
    assert_matches_reference(outputs, new_values, CASE.dtype)


def test_outputs_copied_to_the_other_gpu_and_rotated_again() -> None:
    torch.cuda.set_device(0)
    first = make_args(CASE, "cuda:0")
    out0 = torch.ops.rope.fused_qk(*first)
    # Peer-to-peer copies of the outputs (transposed (B, S, H, D) views, strides kept) and tables.
    second = on_device(first._replace(q=out0[0], k=out0[1]), "cuda:1")
    assert second.q.stride() == out0[0].stride()
    out1 = torch.ops.rope.fused_qk(*second)
    # And back to cuda:0, without waiting, for the inverse rotation there.
    third = RopeArgs(out1[0].to("cuda:0", non_blocking=True), out1[1].to("cuda:0", non_blocking=True),
                     first.cos, first.sin, first.positions)
    out2 = torch.ops.rope.fused_qk_backward(*third)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    assert_matches_reference(out0, first, CASE.dtype)
    assert_matches_reference(out1, second, CASE.dtype)
    assert_matches_reference(out2, third, CASE.dtype, inverse=True)


def test_gradients_on_the_second_gpu() -> None:
    # Autograd runs cuda:1's backward in its own worker thread for that device.
    torch.cuda.set_device(0)
    args = make_args(CASE, "cuda:1", requires_grad=True)
    weight_q = torch.randn(args.q.shape, dtype=CASE.dtype).to("cuda:1")
    weight_k = torch.randn(args.k.shape, dtype=CASE.dtype).to("cuda:1")
    q_out, k_out = torch.ops.rope.fused_qk(*args)
    # In the input dtype, so the incoming gradients are exactly weight_q and weight_k.
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    assert torch.cuda.current_device() == 0
    expected_q, expected_k = reference_grads(args, weight_q, weight_k)
    for grad, expected in ((args.q.grad, expected_q), (args.k.grad, expected_k)):
        assert grad is not None and grad.device == torch.device("cuda:1")
        assert_close_to_reference(grad, expected, CASE.dtype)


def test_mixing_the_two_gpus_is_refused() -> None:
    args = make_args(CASE, "cuda:0")
    with pytest.raises(RuntimeError, match=r"^rope::fused_qk: q and k must be on the same device"):
        torch.ops.rope.fused_qk(args.q, args.k.to("cuda:1"), args.cos, args.sin, args.positions)
    with pytest.raises(RuntimeError, match=r"^rope::fused_qk: cos and sin must be on q's device"):
        torch.ops.rope.fused_qk(args.q, args.k, args.cos.to("cuda:1"), args.sin.to("cuda:1"), args.positions)
    with pytest.raises(RuntimeError, match=r"^rope::fused_qk: positions must be on q's device"):
        torch.ops.rope.fused_qk(args.q, args.k, args.cos, args.sin, args.positions.to("cuda:1"))


def test_graph_capture_and_replay_on_the_second_gpu() -> None:
    torch.cuda.set_device(0)
    static = make_args(CASE, "cuda:1")
    with torch.cuda.device(1):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graphs asks
            torch.ops.rope.fused_qk(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # A capture stream of cuda:1 given explicitly: torch.cuda.graph's default one is made once
        # per process, on whatever device was current then (cuda:0 after an earlier capture).
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            outputs = torch.ops.rope.fused_qk(*static)
    assert torch.cuda.current_device() == 0
    for replay in range(2):
        if replay:  # new inputs in the captured buffers
            for to, value in zip(static, make_args(CASE, "cuda:1")):
                if to is not None:
                    to.copy_(value)
        graph.replay()
        torch.cuda.synchronize(1)
        assert_matches_reference(outputs, static, CASE.dtype)


# The first call of a process, on cuda:1, from a thread that is not the main one: no context is
# current in that thread, and cuda:0 has not been used at all. Then the first call on cuda:0.
FIRST_CALL_ON_SECOND_GPU_FROM_NEW_THREAD = """
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk
from thread_runner import run_in_threads

case = RopeCase(dtype=torch.float16, layout="qkv", positions="s:int32")
result = {}

def first_call():
    args = make_args(case, "cuda:1")
    result["args"] = args
    result["outputs"] = torch.ops.rope.fused_qk(*args)
    torch.cuda.synchronize(1)

run_in_threads(first_call, [()])
args0 = make_args(case, "cuda:0")
outputs0 = torch.ops.rope.fused_qk(*args0)
torch.cuda.synchronize(0)
for args, outputs, device in ((result["args"], result["outputs"], "cuda:1"), (args0, outputs0, "cuda:0")):
    for out, ref in zip(outputs, reference_fused_qk(args)):
        assert out.device == torch.device(device)
        assert_close_to_reference(out, ref, case.dtype)
print("first call on the second GPU from a new thread: ok")
"""


def test_first_call_of_a_process_on_the_second_gpu_from_a_new_thread() -> None:
    run_fresh_python(FIRST_CALL_ON_SECOND_GPU_FROM_NEW_THREAD)


# The first call of a process inside a CUDA graph capture on cuda:1, while cuda:0 is the current
# device outside the capture: the kernel is loaded into cuda:1's context during the capture.
FIRST_CALL_IN_CAPTURE_ON_SECOND_GPU = """
import torch
import rope_kernels
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk

case = RopeCase(dtype=torch.bfloat16, layout="bshd", positions="bs:int64", head_dim=128)
torch.cuda.set_device(0)
args = make_args(case, "cuda:1")
torch.cuda.synchronize(1)
with torch.cuda.device(1):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        outputs = torch.ops.rope.fused_qk(*args)
graph.replay()
torch.cuda.synchronize(1)
for out, ref in zip(outputs, reference_fused_qk(args)):
    assert out.device == torch.device("cuda:1")
    assert_close_to_reference(out, ref, case.dtype)
print("first call inside a capture on the second GPU: ok")
"""


def test_first_call_of_a_process_inside_graph_capture_on_the_second_gpu() -> None:
    run_fresh_python(FIRST_CALL_IN_CAPTURE_ON_SECOND_GPU)
