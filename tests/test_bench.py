"""The benchmark's own logic, on the CPU and in seconds: its workload rows (the op's conventions
among them), its correctness gate in every convention, how it separates the L2 flush from the
calls in a profile, that a wrong candidate is reported and never timed, that a candidate lacking
a feature is reported n/a, and one functional run of `python -m bench --device cpu --smoke` over
every row end to end (the GPU run is documented in docs/performance.md; its timings need the GPU,
its code paths do not)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# The benchmark is a top-level folder of the repository, not part of the installed package.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# The tests also run from a copy of tests/ against an installed wheel, where there is no bench/
# beside them; the benchmark is tested from the source tree only.
if not (REPO_ROOT / "bench" / "__init__.py").exists():
    pytest.skip("bench/ is a repository tool: not beside this copy of the tests", allow_module_level=True)

from bench.candidates import (Candidate, Compiled, Eager, FlashAttn, Liger, Ours, OursInPlace,  # noqa: E402
                              OursRows, Outputs, hf_apply_rotary_pos_emb, rope_formula, timed_load)
from bench.check import check_convention  # noqa: E402
from bench.measure import measure_workload  # noqa: E402
from rope_kernels.testing import DOCUMENT_SEED, WORKLOADS, Workload, check_rotation, document_lengths  # noqa: E402
from bench.report import summary_tables  # noqa: E402
from bench.run import parse_args  # noqa: E402
from bench.timing import (FLUSHES, SMOKE, CpuTimer, CudaTimer, Figure, MeasurementError,  # noqa: E402
                          kernel_us_per_call, make_timer, split_at_markers, without_spans)
from bench.workloads import Inputs, make_inputs, rope_table, workload_by_name  # noqa: E402
from rope_env import requires_cuda  # noqa: E402

CPU = torch.device("cpu")
# The rows of the op's options, after the rows that predate them.
LLAMA_ROWS = ["llama8b-train", "seed-example", "long-128k", "hd64-mha", "hd256-gemma", "fp32", "small-prefill",
              "decode-b1", "decode-b64"]
CONVENTION_ROWS = ["phi4-partial", "glm4-interleaved", "thd-packed", "bshd-decode", "hd512-gemma4"]


def _inputs(name: str) -> Inputs:
    return make_inputs(workload_by_name(name).smoke(), CPU)


@pytest.mark.parametrize("name", ["llama8b-train", "seed-example", "fp32", "decode-b64"])
def test_gate_passes_the_hugging_face_formula(name: str) -> None:
    inputs = _inputs(name)
    cos_half, sin_half = inputs.reference_angles()
    q_out, _ = hf_apply_rotary_pos_emb(inputs.q, inputs.k, inputs.token_cos, inputs.token_sin)
    result = check_rotation("q_out", q_out, inputs.q, cos_half, sin_half, inverse=False)
    assert result.passed and result.worst_ratio <= 1.0, result


def test_gate_rejects_wrong_results() -> None:
    inputs = _inputs("llama8b-train")
    cos_half, sin_half = inputs.reference_angles()
    q_out, _ = hf_apply_rotary_pos_emb(inputs.q, inputs.k, inputs.token_cos, inputs.token_sin)
    q_out = q_out.detach()

    def gate(out: torch.Tensor, inverse: bool = False) -> bool:
        return check_rotation("q_out", out, inputs.q, cos_half, sin_half, inverse).passed

    assert gate(q_out)
    assert not gate(q_out, inverse=True)  # rotated the wrong way
    unwritten = q_out.clone()
    unwritten[1, 3, 5, 7] = float("nan")
    assert not gate(unwritten)
    stale = q_out.clone()
    stale[:, :, -1] = inputs.q[:, :, -1].detach()  # one token left unrotated
    assert not gate(stale)
    assert not gate(q_out.float())  # wrong dtype


def test_profile_segments_and_flush_accounting() -> None:
    flush, marker = {"fill_u8"}, "fill_i16"
    events = [("early", 0.0, 1.0), (marker, 1.0, 0.1),
              ("fill_u8", 2.0, 50.0), ("rope", 52.0, 4.0), ("fill_u8", 57.0, 50.0), ("rope", 107.0, 6.0),
              (marker, 114.0, 0.1),
              ("fill_u8", 115.0, 50.0), ("mul", 165.0, 3.0), ("add", 168.0, 2.0),
              ("fill_u8", 171.0, 50.0), ("mul", 221.0, 3.0), ("add", 224.0, 2.0),
              (marker, 227.0, 0.1)]
    segments = split_at_markers(events, marker)
    assert len(segments) == 2
    assert kernel_us_per_call(segments[0], flush, 1, 2) == pytest.approx(5.0)
    assert kernel_us_per_call(segments[1], flush, 1, 2) == pytest.approx(5.0)
    with pytest.raises(MeasurementError):  # a flush-named kernel inside the calls is refused
        kernel_us_per_call(segments[0] + [("fill_u8", 300.0, 1.0)], flush, 1, 2)


def test_annotation_ranges_are_not_counted_as_work() -> None:
    # A range drawn around two kernels (as an annotation appears on the device timeline).
    events = [("k2", 12.0, 3.0), ("range", 9.0, 7.0), ("k1", 10.0, 2.0), ("k3", 20.0, 1.0)]
    assert without_spans(events) == [("k1", 10.0, 2.0), ("k2", 12.0, 3.0), ("k3", 20.0, 1.0)]
    # A range around a single kernel has exactly its span: counted once.
    single = without_spans([("k", 5.0, 2.0), ("range", 5.0, 2.0), ("next", 8.0, 1.0)])
    assert sum(e[2] for e in single) == pytest.approx(3.0) and single[-1][0] == "next"


class RotatesBackwards(Candidate):
    """A plausible bug: the inverse rotation (sin negated) in the forward."""

    key = "wrong"
    label = "wrong"

    def bind(self, inputs: Inputs) -> Any:
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin

        def call() -> Outputs:
            return hf_apply_rotary_pos_emb(q, k, cos, -sin)

        return call


def test_wrong_candidate_is_reported_and_not_timed() -> None:
    timer = CpuTimer(CPU, SMOKE)
    record: Dict[str, Any] = measure_workload(workload_by_name("small-prefill").smoke(),
                                              [(RotatesBackwards(), None), (Eager(), None)], timer, lambda line: None)
    wrong, eager = record["candidates"]["wrong"], record["candidates"]["eager"]
    assert wrong["status"] == "failed check" and "forward" not in wrong and "host_us" not in wrong
    assert not wrong["check"]["forward"]["passed"]
    assert eager["status"] == "ok" and eager["forward"]["wall_us"] > 0 and eager["backward"]["wall_us"] > 0
    assert eager["host_us"] > 0 and record["floor"]["wall_us"] > 0
    # The reference copy of q and k is timed beside the floor and read against it.
    copy_qk = record["copy_qk"]
    assert copy_qk["wall_us"] > 0 and copy_qk["wall_x"] == pytest.approx(copy_qk["wall_us"] / record["floor"]["wall_us"])


def test_llama_rows_are_unchanged_by_the_options() -> None:
    assert [w.name for w in WORKLOADS] == LLAMA_ROWS + CONVENTION_ROWS
    for name in LLAMA_ROWS:
        workload = workload_by_name(name)
        assert workload.rotary == workload.head_dim and workload.rotary_dim is None and not workload.interleaved
        assert workload.op_layout == "bhsd" and workload.documents == 0 and not workload.packed
        inputs = make_inputs(workload.smoke(), CPU)
        # The op is called exactly as before: no options, on the (B, H, S, D) views themselves.
        assert inputs.options == {} and inputs.native_q is inputs.q and inputs.native_k is inputs.k
        assert inputs.cu_seqlens is None and inputs.table_cos.shape[-1] == workload.head_dim
    assert workload_by_name("llama8b-train").describe() == "B=4 S=4096 Hq=32 Hk=8 D=128 bfloat16 bshd"
    assert workload_by_name("seed-example").describe() == "B=2 S=1024 Hq=32 Hk=32 D=128 float16 bhsd"


def test_convention_rows() -> None:
    expected = {  # name: (B, S, Hq, Hk, D, R, interleaved, op_layout, documents, decode)
        "phi4-partial": (4, 4096, 32, 8, 128, 96, False, "bhsd", 0, False),
        "glm4-interleaved": (4, 4096, 32, 2, 128, 64, True, "bhsd", 0, False),
        "thd-packed": (1, 16384, 32, 8, 128, 128, False, "thd", 64, False),
        "bshd-decode": (64, 1, 32, 8, 128, 128, False, "bshd", 0, True),
        "hd512-gemma4": (2, 4096, 16, 8, 512, 512, False, "bhsd", 0, False),
    }
    options = {"phi4-partial": {"rotary_dim": 96}, "glm4-interleaved": {"interleaved": True, "rotary_dim": 64},
               "thd-packed": {"layout": "thd"}, "bshd-decode": {"layout": "bshd"}, "hd512-gemma4": {}}
    for name, fields in expected.items():
        workload = workload_by_name(name)
        assert (workload.batch, workload.seq, workload.heads_q, workload.heads_k, workload.head_dim, workload.rotary,
                workload.interleaved, workload.op_layout, workload.documents, workload.decode) == fields
        assert workload.dtype == torch.bfloat16 and workload.layout == "bshd"
        # All of q and k, the features past rotary_dim too, read once and written once (bf16).
        assert workload.bytes_moved == 2 * 2 * workload.batch * workload.seq * (
            workload.heads_q + workload.heads_k) * workload.head_dim
        inputs = make_inputs(workload.smoke(), CPU)
        assert {k: v for k, v in inputs.options.items() if k != "cu_seqlens"} == options[name]
        assert inputs.table_cos.shape[-1] == workload.rotary  # the Hugging Face full-width table of R
        assert inputs.token_cos.shape[-1] == workload.rotary
    with pytest.raises(ValueError):
        Workload("odd", 1, 8, 2, 2, 64, torch.float32, rotary_dim=33)
    with pytest.raises(ValueError):
        Workload("unpacked-thd", 2, 8, 2, 2, 64, torch.float32, op_layout="thd", documents=2)


def test_packed_documents_are_fixed_and_mixed() -> None:
    workload = workload_by_name("thd-packed")
    lengths = workload.document_lengths()
    assert len(lengths) == 64 and sum(lengths) == 16384 and min(lengths) >= 1
    # Drawn from a fixed seed: the same documents on every run.
    assert lengths == document_lengths(16384, 64, DOCUMENT_SEED) == workload.document_lengths()
    assert len(set(lengths)) > 32 and max(lengths) > 10 * min(lengths)  # mixed lengths
    with pytest.raises(ValueError):
        document_lengths(4, 5)

    # The smoke row packs fewer documents; each token's table row is its place in its document.
    smoke_lengths = workload.smoke().document_lengths()
    assert len(smoke_lengths) > 1 and sum(smoke_lengths) == workload.smoke().seq
    inputs = _inputs("thd-packed")
    assert inputs.cu_seqlens is not None and inputs.cu_seqlens.dtype == torch.int32
    assert inputs.cu_seqlens.tolist() == [0] + list(itertools.accumulate(smoke_lengths))
    assert inputs.max_seqlen == max(smoke_lengths) and inputs.positions is None
    assert inputs.options["cu_seqlens"] is inputs.cu_seqlens
    rows = torch.cat([torch.arange(n) for n in smoke_lengths])
    torch.testing.assert_close(inputs.token_cos[0], inputs.table_cos[rows], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bshd-decode", "thd-packed"])
def test_op_layout_tensors_hold_the_views(name: str) -> None:
    inputs = _inputs(name)
    cloned = inputs.clone()
    for fresh in (inputs, cloned):
        pairs = ((fresh.native_q, fresh.q), (fresh.native_k, fresh.k), (fresh.native_grad_q, fresh.grad_q),
                 (fresh.native_grad_k, fresh.grad_k))
        for native, heads in pairs:
            assert native.is_contiguous() and native.dim() == (3 if name == "thd-packed" else 4)
            assert heads.data_ptr() == native.data_ptr() and torch.equal(fresh.as_heads(native), heads)
        assert fresh.native_q.is_leaf and fresh.native_q.requires_grad and not fresh.native_grad_q.requires_grad
    assert cloned.native_q.data_ptr() != inputs.native_q.data_ptr() and torch.equal(cloned.native_q, inputs.native_q)


@pytest.mark.parametrize("name", CONVENTION_ROWS)
def test_gate_passes_the_formula_in_every_convention(name: str) -> None:
    inputs = _inputs(name)
    q_out, k_out = Eager().bind(inputs)()
    for out, source in ((q_out, inputs.q), (k_out, inputs.k)):
        result = check_convention("out", out, source, inputs, inverse=False)
        assert result.passed and result.worst_ratio <= 1.0, result


def test_gate_rejects_the_wrong_convention() -> None:
    def passes(out: torch.Tensor, inputs: Inputs) -> bool:
        return check_convention("q_out", out, inputs.q, inputs, False).passed

    # Interleaved pairs rotated as half-split ones.
    glm = _inputs("glm4-interleaved")
    half_split, _ = rope_formula(glm.q, glm.k, glm.token_cos, glm.token_sin, interleaved=False)
    assert not passes(half_split, glm)
    # Partial rotary: the whole head rotated, or a feature past rotary_dim changed by one ulp.
    phi = _inputs("phi4-partial")
    right, _ = rope_formula(phi.q, phi.k, phi.token_cos, phi.token_sin)
    assert passes(right, phi)
    seq = phi.q.shape[2]
    whole_cos, whole_sin = rope_table(phi.table_cos.shape[0], phi.q.shape[-1], phi.q.dtype, CPU)
    whole, _ = hf_apply_rotary_pos_emb(phi.q, phi.k, whole_cos[None, :seq], whole_sin[None, :seq])
    assert not passes(whole, phi)
    nudged = right.detach().clone()
    nudged[1, 2, 3, -1] = nudged[1, 2, 3, -1] * (1 + 2.0**-7)
    assert not passes(nudged, phi)
    # Packed documents: rows counted from the first token instead of each document's start.
    thd = _inputs("thd-packed")
    tokens = thd.q.shape[2]
    ignoring, _ = hf_apply_rotary_pos_emb(thd.q, thd.k, thd.table_cos[None, :tokens], thd.table_sin[None, :tokens])
    assert not passes(ignoring, thd)


def test_candidates_lacking_a_feature_report_it() -> None:
    glm, phi, wide = (workload_by_name(n) for n in ("glm4-interleaved", "phi4-partial", "hd512-gemma4"))
    assert "interleaved" in (Liger().unsupported(glm) or "")
    assert "interleaved" in (OursRows().unsupported(glm) or "")
    assert "256" in (FlashAttn().unsupported(wide) or "")
    for workload in WORKLOADS:
        for candidate in (Ours(), OursInPlace(), Eager(), Compiled()):
            assert candidate.unsupported(workload) is None
        assert (FlashAttn().unsupported(workload) is None) == (workload.head_dim <= 256)

    # Liger rotates part of a head where its release takes rotary_dim (0.8.5 does); else n/a.
    class WithRotaryDim:
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, cos: Any, sin: Any, position_ids: Any = None, unsqueeze_dim: int = 1,
                    rotary_dim: Optional[int] = None) -> None: ...

    class WithoutRotaryDim:
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, cos: Any, sin: Any, position_ids: Any = None,
                    unsqueeze_dim: int = 1) -> None: ...

    liger = Liger()
    liger._function = WithRotaryDim
    assert liger.unsupported(phi) is None and liger.unsupported(workload_by_name("thd-packed")) is None
    liger._function = WithoutRotaryDim
    assert "partial" in (liger.unsupported(phi) or "")
    assert liger.unsupported(workload_by_name("llama8b-train")) is None


def contract_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          seqlen_offsets: Union[int, torch.Tensor] = 0, cu_seqlens: Optional[torch.Tensor] = None,
                          max_seqlen: Optional[int] = None, interleaved: bool = False) -> torch.Tensor:
    """flash-attn's apply_rotary as its docstring and kernel define it, in PyTorch: x (B, S, H, D), or
    (T, H, D) with cu_seqlens and max_seqlen; cos/sin (rows, R/2); token s of sequence b rotated by
    row s + seqlen_offsets[b] (in packed x, s counts from its document's start); float32 math; the
    features past R copied."""
    half = cos.shape[-1]
    if cu_seqlens is None:
        batch, seq = x.shape[:2]
        offsets = (seqlen_offsets.long() if isinstance(seqlen_offsets, torch.Tensor)
                   else torch.full((batch,), seqlen_offsets))
        rows = torch.arange(seq)[None, :] + offsets[:, None]
    else:
        assert max_seqlen is not None
        bounds = cu_seqlens.long().tolist()
        rows = torch.cat([torch.arange(end - start) for start, end in zip(bounds, bounds[1:])])
    c, s = cos[rows].float().unsqueeze(-2), sin[rows].float().unsqueeze(-2)
    rotated = x[..., :2 * half].float()
    x0, x1 = (rotated[..., 0::2], rotated[..., 1::2]) if interleaved else (rotated[..., :half], rotated[..., half:])
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    out = x.clone()
    out[..., :2 * half] = (torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved
                           else torch.cat((o0, o1), dim=-1)).to(x.dtype)
    return out


def test_flash_attn_is_bound_as_its_contract_reads() -> None:
    """The flash-attn candidate on a PyTorch stand-in for apply_rotary (the kernel needs CUDA):
    the views, half tables, position offsets and cu_seqlens it passes give the right rotation on
    every row it supports; a stand-in that ignores the offsets fails the decode rows' check."""
    timer = CpuTimer(CPU, SMOKE)

    def run(name: str, apply: Callable[..., torch.Tensor]) -> Dict[str, Any]:
        flash = FlashAttn()
        flash._apply = apply
        record = measure_workload(workload_by_name(name).smoke(), [(flash, None)], timer, lambda line: None)
        return dict(record["candidates"]["flash-attn"])

    for name in LLAMA_ROWS + CONVENTION_ROWS:
        if name == "long-128k":
            continue  # the same binding as llama8b-train, only longer
        entry = run(name, contract_apply_rotary)
        if workload_by_name(name).head_dim > 256:
            assert entry["status"] == "unavailable" and "head_dim" in entry["error"]
            continue
        assert entry["status"] == "ok", (name, entry)
        assert entry["check"]["forward"]["passed"] and "backward" not in entry["check"]
        assert entry["forward"]["wall_us"] > 0 and "backward" not in entry

    def no_offsets(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: Any, *rest: Any) -> torch.Tensor:
        return contract_apply_rotary(x, cos, sin, 0, *rest)

    for name in ("decode-b64", "bshd-decode"):
        assert run(name, no_offsets)["status"] == "failed check"


def test_compile_runs_the_formula_of_the_row(tmp_path: Path) -> None:
    # torch.compile in its own process (it changes Dynamo's settings), on the row with both
    # partial rotary and interleaved pairs.
    out = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "python"), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--smoke", "--impls", "compile",
               "--workloads", "glm4-interleaved", "--no-cold-start", "--out", str(out)]
    proc = subprocess.run(command, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entry = json.loads((out / "results.json").read_text())["workloads"][0]["candidates"]["compile"]
    assert entry["status"] == "ok", entry
    assert entry["check"]["forward"]["passed"] and entry["check"]["backward"]["passed"]


@requires_cuda
def test_every_candidate_is_right_or_unavailable_on_cuda() -> None:
    """On a GPU, every candidate on every row (smoke sizes) either passes the float64 check or
    is reported unavailable (not installed, or lacking the row's feature): never a wrong figure.
    This library runs every row."""
    device = torch.device("cuda", torch.cuda.current_device())
    timer = make_timer(device, SMOKE)
    candidates: List[Tuple[Candidate, Optional[str]]] = []
    everyone: List[Candidate] = [Ours(), OursRows(), OursInPlace(), Eager(), Liger(), FlashAttn()]
    for candidate in everyone:
        unavailable, _ = timed_load(candidate, device)
        candidates.append((candidate, unavailable))
    for workload in WORKLOADS:
        record = measure_workload(workload.smoke(), candidates, timer, lambda line: None)
        for key, entry in record["candidates"].items():
            assert entry["status"] in ("ok", "unavailable"), (workload.name, key, entry)
        assert record["candidates"]["ours"]["status"] == "ok", (workload.name, record["candidates"]["ours"])


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "python"), env.get("PYTHONPATH", "")) if p)
    rows = ["seed-example", "decode-b64"] + CONVENTION_ROWS
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--smoke",
               "--impls", "ours,ours-rows,ours-inplace,eager,liger,flash-attn",
               "--workloads", ",".join(rows), "--cold-start-workload", "decode-b1", "--out", str(out)]
    proc = subprocess.run(command, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Wall time / copy floor" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["settings"]["flush_by"] == "write"
    assert [w["name"] for w in results["workloads"]] == [w.name for w in WORKLOADS if w.name in rows]
    for workload in results["workloads"]:
        for key in ("ours", "ours-rows", "eager"):
            entry = workload["candidates"][key]
            if key == "ours-rows" and workload["interleaved"]:  # the Hugging Face drop-in has no such pairs
                assert entry["status"] == "unavailable" and "interleaved" in entry["error"], entry
                continue
            assert entry["status"] == "ok", (workload["name"], entry)
            assert entry["check"]["forward"]["passed"] and entry["check"]["backward"]["passed"]
            for direction in ("forward", "backward"):
                assert entry[direction]["wall_us"] > 0 and entry[direction]["wall_gbps"] > 0
        # The in-place op: checked and timed forward only (it has no backward of its own).
        in_place = workload["candidates"]["ours-inplace"]
        assert in_place["status"] == "ok", in_place
        assert in_place["check"]["forward"]["passed"] and "backward" not in in_place["check"]
        assert in_place["forward"]["wall_us"] > 0 and "backward" not in in_place and in_place["host_us"] > 0
        # The Triton peers need CUDA: n/a here, never a figure.
        for key in ("liger", "flash-attn"):
            peer = workload["candidates"][key]
            assert peer["status"] == "unavailable" and "CUDA only" in peer["error"], peer
            assert "forward" not in peer and "check" not in peer
    by_name = {w["name"]: w for w in results["workloads"]}
    assert by_name["thd-packed"]["op_layout"] == "thd" and len(by_name["thd-packed"]["documents"]) == 3
    assert by_name["phi4-partial"]["rotary_dim"] == 96 and by_name["glm4-interleaved"]["interleaved"]
    assert "ours-inplace" not in results["cold_start"]["results"]  # the same import as ours
    cold = results["cold_start"]["results"]["ours"]
    assert "error" not in cold, cold
    assert cold["first_call_ms"] > 0 and cold["files_compiled"] == 0  # nothing compiled at run time
    markdown = (out / "results.md").read_text()
    assert "| workload |" in markdown
    glm_row = [line for line in markdown.splitlines() if line.startswith("| glm4-interleaved |")][0]
    assert "n/a" in glm_row  # the drop-in and the peers that lack interleaved pairs


def test_flush_by_write_or_by_read() -> None:
    """--flush picks how the L2 is emptied: "write" (the default, the notes' zero_()) overwrites
    the buffer; "read" only reads it, so it leaves no dirty lines. The choice is recorded in the
    results and named in the kernel-time table's title."""
    assert parse_args(["--device", "cpu", "--smoke"]).flush == "write"
    assert parse_args(["--device", "cpu", "--smoke", "--flush", "read"]).flush == "read"
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--smoke", "--flush", "sideways"])
    assert sorted(FLUSHES) == ["read", "write"]

    for flush_by, expect_zeroed in (("write", True), ("read", False)):
        timer = CpuTimer(CPU, dataclasses.replace(SMOKE, flush_by=flush_by))
        timer._flush_buffer.fill_(5)
        timer.flush()
        assert bool((timer._flush_buffer == 0).all()) == expect_zeroed
        assert expect_zeroed or bool((timer._flush_buffer == 5).all())

    def kernel_title(flush_by: str) -> str:
        results = {"meta": {"implementations": {}, "settings": {"flush_by": flush_by}}, "workloads": []}
        return str(summary_tables(results)[0]["title"])

    assert kernel_title("write").endswith("(L2 flushed before each call)")
    assert kernel_title("read").endswith("(L2 flushed before each call, by reading)")


class ScriptedTimer(CudaTimer):
    """CudaTimer's bookkeeping over a scripted device timeline instead of a GPU and a profiler:
    the marker, the flush and each call append the events a profiler would report."""

    def __init__(self) -> None:  # no GPU: only the fields the bookkeeping uses
        self.settings = dataclasses.replace(SMOKE, kernel_calls=3)
        self.timeline: list = []
        self.clock = 0.0
        self.profiler_error = None
        self._calibrate()

    def launch(self, name: str, duration: float) -> None:
        self.timeline.append((name, self.clock, duration))
        self.clock += duration + 1.0

    def synchronize(self) -> None:
        pass

    def flush(self) -> None:
        self.launch("FillFunctor<unsigned char>", 50.0)

    def _marker(self) -> None:
        self.launch("FillFunctor<short>", 1.0)

    def _profile(self, body: Any) -> list:
        self.timeline = []
        body()
        return list(self.timeline)


def test_kernel_times_bookkeeping() -> None:
    timer = ScriptedTimer()

    def failing() -> None:
        timer.launch("partial", 1.0)
        raise RuntimeError("broken")

    def two_kernels() -> None:
        timer.launch("mul", 2.0)
        timer.launch("add", 3.0)

    figures = [Figure("floor", lambda: timer.launch("copy", 4.0)),
               Figure("two-kernels", two_kernels),
               Figure("broken", failing),
               # a kernel named like the flush cannot be told apart from it: refused, not guessed
               Figure("flush-alike", lambda: timer.launch("FillFunctor<unsigned char>", 2.0))]
    times = timer.kernel_times(figures)
    assert times["floor"] == pytest.approx(4.0)
    assert times["two-kernels"] == pytest.approx(5.0)
    assert "broken" in str(times["broken"])
    assert "cannot separate" in str(times["flush-alike"])


def test_kernel_times_survive_a_marker_alike_kernel() -> None:
    timer = ScriptedTimer()
    figures = [Figure("floor", lambda: timer.launch("copy", 4.0)),
               Figure("marker-alike", lambda: timer.launch("FillFunctor<short>", 2.0))]
    times = timer.kernel_times(figures)  # segments no longer match: one profile per figure
    assert times["floor"] == pytest.approx(4.0)
    assert "segments" in str(times["marker-alike"])


def test_graph_table_shows_the_copy_next_to_the_candidates() -> None:
    # The decode rows' CUDA-graph figures are absolute (µs); the copy of the same bytes, captured
    # the same way, is what they are read against.
    from bench.report import summary_tables
    ok = {"status": "ok", "forward": {}, "backward": {}}
    results = {
        "meta": {"device": "cuda:0", "implementations": {"ours": {"label": "rope_kernels"},
                                                         "liger": {"label": "Liger"}}},
        "workloads": [
            {"name": "decode-b1", "decode": True, "floor": {"graph_us": 1.11},
             "candidates": {"ours": dict(ok, graph_us=1.48), "liger": dict(ok, graph_us=1.43)}},
            {"name": "decode-b64", "decode": True, "floor": {"graph_us": None, "graph_us_error": "capture failed"},
             "candidates": {"ours": dict(ok, graph_us=2.01), "liger": {"status": "unavailable"}}},
            {"name": "llama8b-train", "decode": False, "floor": {}, "candidates": {"ours": ok, "liger": ok}},
        ],
    }
    graph = [t for t in summary_tables(results) if t["title"].startswith("GPU µs per call inside a CUDA graph")]
    assert len(graph) == 1
    assert graph[0]["header"] == ["workload", "copy", "rope_kernels", "Liger"]
    assert graph[0]["rows"][0] == ["decode-b1", "1.11", "1.48", "1.43"]
    assert graph[0]["rows"][1][:3] == ["decode-b64", "err", "2.01"]
    assert len(graph[0]["rows"]) == 2  # decode rows only


def test_time_tables_show_the_copy_and_clone_of_q_and_k_after_the_floor() -> None:
    # Torch copying q and k themselves is the like-for-like reference for what a candidate moves,
    # and cloning them for what an out-of-place candidate allocates; their ratios sit between the
    # floor and the candidates, in both time tables and the details.
    from bench.report import detail_table, summary_tables
    ok = {"status": "ok", "forward": {"kernel_x": 1.031, "wall_x": 1.05}, "backward": {"kernel_x": 1.035, "wall_x": 2.0}}
    results = {
        "meta": {"device": "cuda:0", "settings": {"flush_by": "write"},
                 "implementations": {"ours": {"label": "rope_kernels"}}},
        "workloads": [{"name": "llama8b-train", "decode": False,
                       "floor": {"kernel_us": 80.0, "wall_us": 85.0},
                       "copy_qk": {"kernel_us": 82.6, "kernel_x": 1.0325, "wall_us": 90.1, "wall_x": 1.06},
                       "clone_qk": {"kernel_us": 83.0, "kernel_x": 1.0375, "wall_us": 170.0, "wall_x": 2.0},
                       "candidates": {"ours": ok}}],
    }
    kernel, wall = summary_tables(results)[:2]
    assert kernel["header"][:5] == ["workload", "floor µs", "q,k copy", "q,k clone", "rope_kernels"]
    assert kernel["rows"][0] == ["llama8b-train", "80.0", "1.03", "1.04", "1.03/1.03"]
    assert wall["rows"][0][:5] == ["llama8b-train", "85.0", "1.06", "2.00", "1.05/2.00"]
    copy_rows = [row for row in detail_table(results)["rows"] if row[1] in ("copy of q and k", "clone of q and k")]
    assert copy_rows == [["llama8b-train", "copy of q and k", "", "82.6", "1.03", "-", "90.1", "1.06", "-"],
                         ["llama8b-train", "clone of q and k", "", "83.0", "1.04", "-", "170.0", "2.00", "-"]]
