"""`python -m bench`: RoPE side by side with its peers on every workload of the project's table.

For each workload: the copy floor, then each implementation checked against a float64
reference and, if right, timed forward and backward (kernel time and wall time, each in µs, as
a ratio to the copy floor and as GB/s achieved), its host time per call, and for decode rows its
GPU time per call inside a CUDA graph; at the end, the cold start of each implementation.
Writes results.json (after every workload, so a stopped run keeps what it measured),
results.md and bandwidth.png into --out, and prints the tables.

Exit status: 0 when this library passed every check it ran, 1 when it failed one (or could not
be loaded), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import cold_start
from .candidates import CANDIDATE_KEYS, Candidate, make_candidate, timed_load
from .measure import measure_workload
from .plot import plot_bandwidth
from .report import markdown_report, text_report, write_json
from .timing import FLUSHES, FULL, QUICK, SMOKE, Settings, Timer, make_timer
from .workloads import WORKLOADS, Workload, workload_by_name


# The package each peer comes from, for the versions line of the results.
PEER_PACKAGES: Dict[str, str] = {"liger": "liger-kernel", "flash-attn": "flash-attn"}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results", help="directory for results.json, results.md, "
                        "bandwidth.png (default: bench-results)")
    parser.add_argument("--workloads", default="all",
                        help="comma-separated workload names (default: all): " + ", ".join(w.name for w in WORKLOADS))
    parser.add_argument("--impls", default="all",
                        help="comma-separated implementations (default: all): " + ", ".join(CANDIDATE_KEYS))
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, no cold start (for iterating; noisier)")
    parser.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold-start figures")
    parser.add_argument("--cold-start-workload", default="llama8b-train",
                        help="workload of the cold-start first call (default: llama8b-train)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda (the CPU gives functional runs only: see --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and repetitions: checks that everything runs, times mean nothing")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds after which remaining workloads and the cold start are skipped "
                             "(default 0: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--flush", choices=sorted(FLUSHES), default="write",
                        help="how the L2 is emptied before each timed call: write (a zero_() of 256 MB, "
                             "the default and the definition the results use) or read (a max over it, "
                             "which leaves no dirty lines for the call to write back; docs/performance.md)")
    args = parser.parse_args(argv)

    args.workload_list = _pick(parser, args.workloads, [w.name for w in WORKLOADS], "--workloads")
    args.impl_list = _pick(parser, args.impls, CANDIDATE_KEYS, "--impls")
    if args.cold_start_workload not in [w.name for w in WORKLOADS]:
        parser.error("--cold-start-workload: unknown workload {!r}".format(args.cold_start_workload))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else None
        if args.device is None:
            parser.error("torch sees no CUDA device; for a functional run on the CPU use --device cpu --smoke")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def _pick(parser: argparse.ArgumentParser, text: str, known: List[str], option: str) -> List[str]:
    if text == "all":
        return list(known)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        parser.error("{}: unknown {}; known: {}".format(option, ", ".join(unknown) or "(none given)", ", ".join(known)))
    return [name for name in known if name in chosen]  # the table's order


def _nvidia_smi() -> Optional[str]:
    """Clocks, temperature and power as nvidia-smi reads them (read only; None without it)."""
    query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=" + query, "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _triton_version() -> Optional[str]:
    try:
        import triton
        return str(triton.__version__)
    except Exception:  # noqa: BLE001
        return None


def gather_meta(args: argparse.Namespace, device: torch.device, settings: Settings, timer: Timer,
                candidates: List[Tuple[Candidate, Optional[str]]], load_s: Dict[str, float]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU ({})".format(
            platform.machine()),
        "versions": {"torch": torch.__version__, "triton": _triton_version(), "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "settings": dataclasses.asdict(settings),
        "arguments": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
        "kernel_time": timer.profiler_error or ("torch.profiler device time" if timer.kind == "cuda"
                                                else "not measured on the CPU"),
        "implementations": {},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["capability"] = "{}.{}".format(props.major, props.minor)
        meta["multiprocessors"] = props.multi_processor_count
        meta["l2_bytes"] = getattr(props, "L2_cache_size", None)
        meta["nvidia_smi_start"] = _nvidia_smi()
    for candidate, unavailable in candidates:
        info: Dict[str, Any] = {"label": candidate.label, "version": candidate.version(),
                                "available": unavailable is None, "load_s": load_s[candidate.key]}
        if unavailable is not None:
            info["unavailable"] = unavailable
        if getattr(candidate, "source", "") and unavailable is None:  # where a peer's code came from
            info["source"] = getattr(candidate, "source")
        meta["implementations"][candidate.key] = info
        if candidate.key == "ours" and unavailable is None:
            meta["versions"]["rope_kernels"] = candidate.version()
            try:
                from .library import import_rope_kernels
                meta["rope_kernels_build"] = import_rope_kernels().build_info()
            except Exception as error:  # noqa: BLE001  (a fact to record, not a reason to stop)
                meta["rope_kernels_build"] = "build_info() failed: {}".format(error)
        if candidate.key in PEER_PACKAGES and unavailable is None:
            meta["versions"][PEER_PACKAGES[candidate.key]] = candidate.version()
    return meta


def _workload_line(record: Dict[str, Any]) -> str:
    """One line per workload as it finishes: floor and each candidate's kernel-time ratios."""
    floor = record.get("floor", {})
    cells = []
    for entry in record["candidates"].values():
        if entry.get("status") != "ok":
            cells.append("{} {}".format(entry["label"], entry.get("status")))
            continue
        ratios = [entry.get(d, {}).get("kernel_x") or entry.get(d, {}).get("wall_x") for d in ("forward", "backward")]
        cells.append("{} {}".format(entry["label"], "/".join("-" if r is None else "{:.2f}".format(r) for r in ratios)))
    return "  floor {} µs kernel, {} µs wall | {}".format(
        "-" if floor.get("kernel_us") is None else "{:.1f}".format(floor["kernel_us"]),
        "-" if floor.get("wall_us") is None else "{:.1f}".format(floor["wall_us"]), "; ".join(cells))


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device() wants an index
    settings = dataclasses.replace(SMOKE if args.smoke else QUICK if args.quick else FULL, flush_by=args.flush)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.smoke and device.type == "cpu":
        # Tiny tensors: one thread, so a busy machine's cores do not stall the parallel regions.
        torch.set_num_threads(1)

    workloads: List[Workload] = [workload_by_name(name) for name in args.workload_list]
    if args.smoke:
        workloads = [w.smoke() for w in workloads]
    timer = make_timer(device, settings)
    if timer.profiler_error:
        log("kernel times unavailable: " + timer.profiler_error)

    candidates: List[Tuple[Candidate, Optional[str]]] = []
    load_s: Dict[str, float] = {}
    for key in args.impl_list:
        candidate = make_candidate(key)
        unavailable, seconds = timed_load(candidate, device)
        candidates.append((candidate, unavailable))
        load_s[key] = seconds
        log("{:<14} {}".format(candidate.label, "unavailable: " + unavailable if unavailable else
                               "version {} (loaded in {:.2f} s)".format(candidate.version(), seconds)))

    results: Dict[str, Any] = {"meta": gather_meta(args, device, settings, timer, candidates, load_s),
                               "workloads": [], "cold_start": None}
    log("{} | {}".format(results["meta"]["device_name"], ", ".join(
        "{} {}".format(k, v) for k, v in results["meta"]["versions"].items() if v)))

    def out_of_time() -> bool:
        return args.time_limit > 0 and time.perf_counter() - started > args.time_limit

    for workload in workloads:
        if out_of_time():
            results["workloads"].append({"name": workload.name, "skipped": "time limit"})
            log("{}: skipped (time limit)".format(workload.name))
            continue
        log("{}: {} ({:.1f} MB moved)".format(workload.name, workload.describe(), workload.bytes_moved / 1e6))
        try:
            record = measure_workload(workload, candidates, timer, log)
        except Exception as error:  # noqa: BLE001  (keep the other workloads' figures)
            record = {"name": workload.name, "skipped": "error: {}: {}".format(type(error).__name__, error)}
            log("  " + record["skipped"])
        else:
            log(_workload_line(record))
        results["workloads"].append(record)
        write_json(results, out / "results.json")
        _free_memory(device)

    run_cold = not (args.no_cold_start or args.quick)
    if run_cold and out_of_time():
        results["cold_start"] = {"skipped": "time limit"}
    elif run_cold:
        cold: Dict[str, Any] = {"workload": args.cold_start_workload, "results": {}}
        for candidate, unavailable in candidates:
            if unavailable is not None or not candidate.measures_cold_start:
                continue
            if out_of_time():
                cold["results"][candidate.key] = {"error": "skipped (time limit)"}
                continue
            entry = cold_start.measure(candidate.key, args.cold_start_workload, args.device, args.smoke)
            cold["results"][candidate.key] = entry
            log("cold start {:<14} {}".format(candidate.label, entry.get("error") or
                "import {:.1f} ms, first call {:.1f} ms, {} files compiled".format(
                    entry["import_ms"], entry["first_call_ms"], entry["files_compiled"])))
        results["cold_start"] = cold

    if device.type == "cuda":
        results["meta"]["nvidia_smi_end"] = _nvidia_smi()
    results["meta"]["elapsed_s"] = time.perf_counter() - started
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown_report(results))
    try:
        plot_problem = plot_bandwidth(results, out / "bandwidth.png")
    except Exception as error:  # noqa: BLE001  (the tables and the JSON are already written)
        plot_problem = "{}: {}".format(type(error).__name__, error)
    if plot_problem:
        log("plot not written: " + plot_problem)
    return results


def library_passed(results: Dict[str, Any]) -> bool:
    """This library loaded and passed every check it ran."""
    info = results["meta"]["implementations"].get("ours")
    if info is None:
        return True  # not asked for
    if not info["available"]:
        return False
    return all(w.get("candidates", {}).get("ours", {}).get("status", "ok") == "ok" for w in results["workloads"])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    results = run(args, log)
    log("")
    log(text_report(results))
    log("wrote {} in {:.0f} s".format(", ".join(sorted(p.name for p in Path(args.out).iterdir())),
                                     results["meta"]["elapsed_s"]))
    passed = library_passed(results)
    if not passed:
        log("rope_kernels FAILED: see the lines above")
    return 0 if passed else 1
