"""The results as tables (terminal and Markdown) and as JSON.

Summary cells show "forward/backward" ratios to the copy floor, next to the ratios of two
references: torch copying q and k themselves into tensors allocated beforehand ("q,k copy"), and
cloning them ("q,k clone": into fresh tensors, as an out-of-place op returns them). "n/a" marks a candidate that is
not available here or lacks a feature of the row (interleaved pairs, partial rotary, a head size;
the JSON says which), "FAIL" one that failed the correctness check (never timed), "err" a figure
that could not be taken (the JSON says why), "-" a figure that does not exist on this device or
for this candidate (the in-place op has no backward of its own).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .measure import DIRECTIONS, REFERENCES

STATUS_MARKS: Dict[str, str] = {"unavailable": "n/a", "failed check": "FAIL", "error": "err"}


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 99.5:
        return "{:.0f}".format(value)
    if value >= 9.95:
        return "{:.1f}".format(value)
    return "{:.2f}".format(value)


def _number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else "{:.{}f}".format(value, digits)


def _pair_cell(entry: Dict[str, Any], field: str) -> str:
    """'fwd/bwd' of one field (kernel_x, wall_x, ...) of a candidate's entry."""
    status = entry.get("status")
    if status != "ok":
        return STATUS_MARKS.get(str(status), "-")
    values = []
    for direction in DIRECTIONS:
        figure = entry.get(direction, {})
        if figure.get(field) is None and figure.get(field.split("_")[0] + "_error"):
            values.append("err")
        else:
            values.append(_ratio(figure.get(field)))
    return "/".join(values)


def _single_cell(entry: Dict[str, Any], field: str, digits: int = 1) -> str:
    status = entry.get("status")
    if status != "ok":
        return STATUS_MARKS.get(str(status), "-")
    if entry.get(field) is None and entry.get(field + "_error"):
        return "err"
    return _number(entry.get(field), digits)


def _labels(results: Dict[str, Any]) -> List[str]:
    return list(results["meta"]["implementations"].keys())


def _header_label(results: Dict[str, Any], key: str) -> str:
    return str(results["meta"]["implementations"][key]["label"])


def summary_tables(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each table as {title, header, rows}: the same content for the terminal and Markdown."""
    keys = _labels(results)
    names = [_header_label(results, key) for key in keys]
    tables = []
    flushed = "L2 flushed before each call" + (
        "" if results["meta"].get("settings", {}).get("flush_by", "write") == "write" else ", by reading")
    for time_kind, title in (("kernel", "Kernel time / copy floor, forward/backward ({})".format(flushed)),
                             ("wall", "Wall time / copy floor, forward/backward (host overhead included)")):
        rows = []
        for workload in results["workloads"]:
            if workload.get("skipped"):
                continue
            floor = workload.get("floor", {}).get(time_kind + "_us")
            references = [_ratio((workload.get(key) or {}).get(time_kind + "_x")) for key, _ in REFERENCES]
            rows.append([workload["name"], _number(floor)] + references +
                        [_pair_cell(workload["candidates"].get(key, {}), time_kind + "_x") for key in keys])
        tables.append({"title": title, "header": ["workload", "floor µs", "q,k copy", "q,k clone"] + names,
                       "rows": rows})

    rows = []
    for workload in results["workloads"]:
        if workload.get("skipped"):
            continue
        rows.append([workload["name"], _number(workload.get("host_us_torch_add"))] +
                    [_single_cell(workload["candidates"].get(key, {}), "host_us") for key in keys])
    tables.append({"title": "Host µs per call (forward, no grad; loop of calls, one synchronize)",
                   "header": ["workload", "torch.add"] + names, "rows": rows})

    rows = []
    for workload in results["workloads"]:
        if workload.get("decode") and not workload.get("skipped"):
            floor = workload.get("floor") or {}
            copy_cell = "err" if floor.get("graph_us_error") else _number(floor.get("graph_us"), 2)
            rows.append([workload["name"], copy_cell] +
                        [_single_cell(workload["candidates"].get(key, {}), "graph_us", 2) for key in keys])
    if rows and results["meta"]["device"].startswith("cuda"):
        tables.append({"title": "GPU µs per call inside a CUDA graph (decode, forward, no grad)",
                       "header": ["workload", "copy"] + names, "rows": rows})

    cold = results.get("cold_start") or {}
    if cold.get("results"):
        rows = []
        for key, entry in cold["results"].items():
            if "error" in entry:
                rows.append([_header_label(results, key), "err", "err", "err", entry["error"][:60]])
            else:
                rows.append([_header_label(results, key), _number(entry.get("import_ms")),
                             _number(entry.get("first_call_ms")), _number(entry.get("second_call_ms"), 2),
                             str(entry.get("files_compiled"))])
        tables.append({"title": "Cold start ({}, fresh process, empty Triton/Inductor caches; ms)".format(cold["workload"]),
                       "header": ["implementation", "import", "first call", "second call", "files compiled"],
                       "rows": rows})
    return tables


def detail_table(results: Dict[str, Any]) -> Dict[str, Any]:
    """One row per workload, implementation and direction, with every figure."""
    rows = []
    for workload in results["workloads"]:
        if workload.get("skipped"):
            continue
        floor = workload.get("floor", {})
        rows.append([workload["name"], "copy floor", "", _number(floor.get("kernel_us")),
                     "-" if floor.get("kernel_us") is None else "1.00", _number(floor.get("kernel_gbps"), 0),
                     _number(floor.get("wall_us")), "-" if floor.get("wall_us") is None else "1.00",
                     _number(floor.get("wall_gbps"), 0)])
        for reference, label in REFERENCES:
            figures = workload.get(reference)
            if figures:
                rows.append([workload["name"], label, "", _number(figures.get("kernel_us")),
                             _ratio(figures.get("kernel_x")), _number(figures.get("kernel_gbps"), 0),
                             _number(figures.get("wall_us")), _ratio(figures.get("wall_x")),
                             _number(figures.get("wall_gbps"), 0)])
        for key, entry in workload["candidates"].items():
            if entry.get("status") != "ok":
                rows.append([workload["name"], entry.get("label", key), STATUS_MARKS.get(entry.get("status"), "-"),
                             "", "", "", "", "", ""])
                continue
            for direction in DIRECTIONS:
                if direction not in entry:
                    continue  # a forward-only candidate
                figure = entry[direction]
                rows.append([workload["name"], entry.get("label", key), {"forward": "fwd", "backward": "bwd"}[direction],
                             _number(figure.get("kernel_us")), _ratio(figure.get("kernel_x")),
                             _number(figure.get("kernel_gbps"), 0), _number(figure.get("wall_us")),
                             _ratio(figure.get("wall_x")), _number(figure.get("wall_gbps"), 0)])
    return {"title": "All figures (µs, x copy floor, GB/s achieved)",
            "header": ["workload", "implementation", "dir", "kernel µs", "x", "GB/s", "wall µs", "x", "GB/s"],
            "rows": rows}


def format_text_table(table: Dict[str, Any]) -> str:
    header: Sequence[str] = table["header"]
    rows: List[List[str]] = table["rows"]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    return "\n".join([table["title"], line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_markdown_table(table: Dict[str, Any]) -> str:
    header: Sequence[str] = table["header"]
    lines = ["**{}**".format(table["title"]), "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def headline(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    versions = ", ".join("{} {}".format(name, meta["versions"][name]) for name in meta["versions"]
                         if meta["versions"][name])
    return "{} on {}; {}".format(meta["date"], meta["device_name"], versions)


def failures(results: Dict[str, Any]) -> List[str]:
    lines = []
    for workload in results["workloads"]:
        if workload.get("skipped"):
            lines.append("{}: skipped: {}".format(workload["name"], workload["skipped"]))
        for key, entry in workload.get("candidates", {}).items():
            if entry.get("status") in ("failed check", "error"):
                lines.append("{} / {}: {}: {}".format(workload["name"], entry.get("label", key),
                                                      entry["status"], entry.get("error", "")))
    return lines


def text_report(results: Dict[str, Any]) -> str:
    """Details first, the summary tables last (the end of the output is what one reads)."""
    parts = [format_text_table(detail_table(results))]
    parts += [format_text_table(table) for table in summary_tables(results)]
    problems = failures(results)
    if problems:
        parts.append("Not timed:\n" + "\n".join("  " + line for line in problems))
    parts.append(headline(results))
    return "\n\n".join(parts)


def markdown_report(results: Dict[str, Any]) -> str:
    parts = ["# RoPE benchmark", "", headline(results) + ".", "",
             "Ratios are time / time of a plain copy of the same bytes, measured the same way in the same run "
             "(1.00 = the memory system's limit); see docs/performance.md for the method."]
    for table in summary_tables(results) + [detail_table(results)]:
        parts += ["", format_markdown_table(table)]
    problems = failures(results)
    if problems:
        parts += ["", "Not timed:", ""] + ["- " + line for line in problems]
    return "\n".join(parts) + "\n"


def _json_safe(value: Any) -> Any:
    """JSON has no inf or NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(results: Dict[str, Any], path: Path) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(_json_safe(results), indent=1, sort_keys=False) + "\n")
    partial.replace(path)  # a reader never sees half a file, even if the run is killed
