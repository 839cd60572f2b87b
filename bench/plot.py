"""PNG of the achieved bandwidth per workload and implementation (matplotlib, imported only here:
where it is missing the run goes on without the plot)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .measure import COPY_QK, DIRECTIONS

PANELS = [("kernel", "kernel time (L2 flushed)"), ("wall", "wall time (host included)")]


def plot_bandwidth(results: Dict[str, Any], path: Path) -> Optional[str]:
    """Writes the plot; returns why it was not written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return "matplotlib is not installed ({})".format(error)

    workloads = [w for w in results["workloads"] if not w.get("skipped") and w.get("floor")]
    if not workloads:
        return "no workload was measured"
    keys: List[str] = list(results["meta"]["implementations"].keys())
    labels = [results["meta"]["implementations"][key]["label"] for key in keys]
    width = 0.8 / max(1, len(keys))
    figure, axes = plt.subplots(len(PANELS), len(DIRECTIONS), figsize=(15, 9), squeeze=False)
    for row, (kind, kind_title) in enumerate(PANELS):
        for column, direction in enumerate(DIRECTIONS):
            ax = axes[row][column]
            measured = False
            for index, (key, label) in enumerate(zip(keys, labels)):
                heights = []
                for workload in workloads:
                    entry = workload["candidates"].get(key, {})
                    value = entry.get(direction, {}).get(kind + "_gbps") if entry.get("status") == "ok" else None
                    heights.append(value or 0.0)
                    measured = measured or bool(value)
                positions = [i - 0.4 + width * (index + 0.5) for i in range(len(workloads))]
                ax.bar(positions, heights, width, label=label)
            for i, workload in enumerate(workloads):
                floor = workload["floor"].get(kind + "_gbps")
                if floor:  # the copy of the same bytes, measured the same way
                    ax.hlines(floor, i - 0.45, i + 0.45, colors="black", linewidths=1.5,
                              label="copy floor" if i == 0 else None)
                copy_qk = (workload.get(COPY_QK) or {}).get(kind + "_gbps")
                if copy_qk:  # torch copying q and k themselves
                    ax.hlines(copy_qk, i - 0.45, i + 0.45, colors="gray", linewidths=1.2, linestyles="dashed",
                              label="copy of q and k" if i == 0 else None)
            if not measured:
                ax.text(0.5, 0.5, "not measured here", transform=ax.transAxes, ha="center", color="gray")
            ax.set_xticks(list(range(len(workloads))))
            ax.set_xticklabels([w["name"] for w in workloads], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("GB/s achieved")
            ax.set_title("{}, {}".format(direction, kind_title), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    # The wall-time panels always have the floor drawn: their legend names everything.
    handles, names = axes[-1][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(names), fontsize=9)
    meta = results["meta"]
    figure.suptitle("RoPE q+k bytes moved per second: {} ({})".format(meta["device_name"], meta["date"]))
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(str(path), dpi=110)
    plt.close(figure)
    return None
