"""Results of the training benchmarks as files: JSON (everything), a markdown table (what
docs/PERFORMANCE.md takes) and, for train_bench, a bar chart of step time per mode split by phase.

Each write replaces the files whole (written beside, then renamed), so a run stopped at any
point leaves the last complete set.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List

__all__ = ["write_outputs", "train_table", "zero_table", "write_chart"]

# Stacked bar order (bottom to top); data is wall time waiting for the batch.
CHART_PHASES = ("data", "vggt", "vision", "merger", "llm_forward", "forward_other", "backward", "optimizer")


def _replace(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _gib(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def train_table(results: dict) -> str:
    """The markdown of a train_bench result: modes, vision attention, ratios, notes."""
    lines = [f"Card: {results.get('card', results.get('device'))}; date {results.get('date_utc')} UTC; "
             f"torch {results.get('torch')}, transformers {results.get('transformers')}",
             f"Command: `{results.get('command')}`", ""]
    head = ["mode", "step ms", "data ms", *CHART_PHASES[1:], "peak GiB", "VGGT weights GiB", "VGGT call GiB",
            "vs floor", "steps"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = results["modes"].get("floor", {}).get("step_ms")
    for name, m in results["modes"].items():
        if "step_ms" not in m:
            lines.append(f"| {name} | " + m.get("error", m.get("skipped", "")) + " |" + " |" * (len(head) - 2))
            continue
        ph = m.get("phases_ms", {})
        ratio = f"{m['step_ms'] / floor:.3f}" if floor else "-"
        lines.append("| " + " | ".join([name, _ms(m["step_ms"]), _ms(m["data_ms"]),
                                        *[_ms(ph.get(p)) for p in CHART_PHASES[1:]],
                                        _gib(m.get("peak_gib")), _gib(m.get("vggt_weights_gib")),
                                        _gib(m.get("vggt_call_peak_gib")), ratio, str(m["timed_steps"])]) + " |")
    lines += ["", "Vision tower attention on the cached step:", "",
              "| implementation | cached step ms | vision ms | share of step | note |", "|---|---|---|---|---|"]
    for impl, v in results.get("vision_attention", {}).items():
        share = "-" if v.get("vision_share") is None else f"{100 * v['vision_share']:.1f}%"
        lines.append(f"| {impl} | {_ms(v.get('step_ms'))} | {_ms(v.get('vision_ms'))} | {share} | "
                     f"{v.get('error', '')} |")
    summary = results.get("summary", {})
    if summary:
        lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                              for k, v in summary.items())]
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def zero_table(results: dict) -> str:
    """The markdown of a train_zero_bench result: one row per DeepSpeed run."""
    lines = [f"Card: {results.get('card', results.get('device'))}; date {results.get('date_utc')} UTC",
             f"Command: `{results.get('command')}`", "",
             "| run | step ms (median) | data ms | peak GiB | steps | VGGT partitioned | VGGT gathered | "
             "model params partitioned | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.get("runs", {}).items():
        probe = r.get("probe", {})
        lines.append("| " + " | ".join([
            name, _ms(r.get("step_ms")), _ms(r.get("data_ms")), _gib(probe.get("peak_gib")),
            str(r.get("timed_steps", "-")), str(probe.get("vggt_partitioned", "-")),
            str(probe.get("vggt_gathered", "-")), str(probe.get("model_partitioned", "-")),
            r.get("error", r.get("skipped", ""))]) + " |")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_chart(path: str, results: dict) -> str:
    """Stacked bars of the median step per mode (and per vision attention implementation of the
    cached step). Returns a note: where it went, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"chart skipped: matplotlib is not importable ({e})"
    rows: List[tuple] = [(name, m) for name, m in results["modes"].items() if "step_ms" in m]
    if not rows:
        return "chart skipped: no mode finished"
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(rows) + 2.2))
    left = [0.0] * len(rows)
    for phase in CHART_PHASES:
        widths = [(m["data_ms"] if phase == "data" else m["phases_ms"].get(phase) or 0.0) for _, m in rows]
        ax.barh([n for n, _ in rows], widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    for y, (_, m) in enumerate(rows):
        ax.text(left[y], y, f" {m['step_ms']:.0f} ms step", va="center", fontsize=8)
    ax.set_xlim(0, 1.18 * max(left))
    ax.invert_yaxis()
    clock = "CUDA events" if results.get("device") == "cuda" else "wall time (CPU)"
    ax.set_xlabel(f"milliseconds per step: medians per phase ({clock}), data wait from wall time")
    ax.set_title(f"Training step by mode, {results.get('card', results.get('device'))}")
    ax.legend(ncol=len(CHART_PHASES), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return f"chart: {os.path.basename(path)}"


def write_outputs(out: str, name: str, results: dict, *, log: Callable[[str], None] = print) -> None:
    """<out>/<name>.json, <name>.md and (train_bench) <name>.png."""
    os.makedirs(out, exist_ok=True)
    if results.get("benchmark") == "train_bench":
        note = write_chart(os.path.join(out, name + ".png"), results)
        results["chart"] = note
        table = train_table(results)
    else:
        table = zero_table(results)
    _replace(os.path.join(out, name + ".json"), json.dumps(results, indent=1, default=str) + "\n")
    _replace(os.path.join(out, name + ".md"), table)
    log(f"wrote {name}.json, {name}.md" + (f" ({results['chart']})" if "chart" in results else ""))
