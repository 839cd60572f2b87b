"""The benchmark's own logic, on the CPU and in seconds: its correctness gate, how it separates the
L2 flush from the calls in a profile, that a wrong candidate is reported and never timed, and one
functional run of `python -m bench --device cpu --smoke` end to end (the GPU run is documented
in docs/performance.md; its timings need the GPU, its code paths do not)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

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

from bench.candidates import Candidate, Eager, Outputs, hf_apply_rotary_pos_emb  # noqa: E402
from bench.measure import measure_workload  # noqa: E402
from rope_kernels.testing import check_rotation  # noqa: E402
from bench.report import summary_tables  # noqa: E402
from bench.run import parse_args  # noqa: E402
from bench.timing import (FLUSHES, SMOKE, CpuTimer, CudaTimer, Figure, MeasurementError,  # noqa: E402
                          kernel_us_per_call, split_at_markers, without_spans)
from bench.workloads import Inputs, make_inputs, workload_by_name  # noqa: E402

CPU = torch.device("cpu")


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


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "python"), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--smoke", "--impls", "ours,ours-rows,ours-inplace,eager",
               "--workloads", "seed-example,decode-b64", "--cold-start-workload", "decode-b1", "--out", str(out)]
    proc = subprocess.run(command, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Wall time / copy floor" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["settings"]["flush_by"] == "write"
    assert [w["name"] for w in results["workloads"]] == ["seed-example", "decode-b64"]
    for workload in results["workloads"]:
        for key in ("ours", "ours-rows", "eager"):
            entry = workload["candidates"][key]
            assert entry["status"] == "ok", entry
            assert entry["check"]["forward"]["passed"] and entry["check"]["backward"]["passed"]
            for direction in ("forward", "backward"):
                assert entry[direction]["wall_us"] > 0 and entry[direction]["wall_gbps"] > 0
        # The in-place op: checked and timed forward only (it has no backward of its own).
        in_place = workload["candidates"]["ours-inplace"]
        assert in_place["status"] == "ok", in_place
        assert in_place["check"]["forward"]["passed"] and "backward" not in in_place["check"]
        assert in_place["forward"]["wall_us"] > 0 and "backward" not in in_place and in_place["host_us"] > 0
    assert "ours-inplace" not in results["cold_start"]["results"]  # the same import as ours
    cold = results["cold_start"]["results"]["ours"]
    assert "error" not in cold, cold
    assert cold["first_call_ms"] > 0 and cold["files_compiled"] == 0  # nothing compiled at run time
    assert "| workload |" in (out / "results.md").read_text()


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


def test_time_tables_show_the_copy_of_q_and_k_after_the_floor() -> None:
    # Torch copying q and k themselves is the like-for-like reference for what a candidate moves;
    # its ratio sits between the floor and the candidates, in both time tables and the details.
    from bench.report import detail_table, summary_tables
    ok = {"status": "ok", "forward": {"kernel_x": 1.031, "wall_x": 1.05}, "backward": {"kernel_x": 1.035, "wall_x": 2.0}}
    results = {
        "meta": {"device": "cuda:0", "settings": {"flush_by": "write"},
                 "implementations": {"ours": {"label": "rope_kernels"}}},
        "workloads": [{"name": "llama8b-train", "decode": False,
                       "floor": {"kernel_us": 80.0, "wall_us": 85.0},
                       "copy_qk": {"kernel_us": 82.6, "kernel_x": 1.0325, "wall_us": 90.1, "wall_x": 1.06},
                       "candidates": {"ours": ok}}],
    }
    kernel, wall = summary_tables(results)[:2]
    assert kernel["header"][:4] == ["workload", "floor µs", "q,k copy", "rope_kernels"]
    assert kernel["rows"][0] == ["llama8b-train", "80.0", "1.03", "1.03/1.03"]
    assert wall["rows"][0][:4] == ["llama8b-train", "85.0", "1.06", "1.05/2.00"]
    copy_rows = [row for row in detail_table(results)["rows"] if row[1] == "copy of q and k"]
    assert copy_rows == [["llama8b-train", "copy of q and k", "", "82.6", "1.03", "-", "90.1", "1.06", "-"]]
