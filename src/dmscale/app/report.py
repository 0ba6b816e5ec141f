"""Run reports: result and structure tables (terminal + report.md) and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from dmscale.serialization.format import atomic_write_text

__all__ = ["format_table", "budget_lines", "results_table", "structure_table", "stages_text", "render", "write_report",
           "plot_resource", "plot_widths", "plot_acc_flops", "read_log"]


def _human(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_table(rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Align rows (first row = header) as a plain or a Markdown table."""
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        lines = ["| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
        return "\n".join(lines)
    lines = ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def stages_text(describe: dict[str, Any] | None) -> str:
    """'blocks 2-1-2' style summary of a ResNet's stages (from ``zoo.describe``)."""
    if not describe or not describe.get("stages"):
        return "-"
    return "-".join(str(s["blocks"]) for s in describe["stages"])


def widths_text(describe: dict[str, Any] | None) -> str:
    """Stage output widths, e.g. '24/48/96'."""
    if not describe or not describe.get("stages"):
        return "-"
    return "/".join(str(s["out"][0]) if s["out"] else "-" for s in describe["stages"])


def _metric(summary: dict[str, Any]) -> tuple[str, str]:
    """(row key, column label) of the run's metric: accuracy, perplexity or a --loss mean (runs before 0.3: acc)."""
    m = summary.get("metric") or {}
    return m.get("key", "acc"), m.get("label", "test acc")


def _metric_text(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if key == "acc" else f"{value:.4g}"


def results_table(summary: dict[str, Any], markdown: bool = False) -> str:
    """Model | FLOPs | params | metric | blocks per stage | stage widths, one row per model of the run."""
    ref = summary.get("reference") or {}
    kind = summary.get("target", {}).get("resource", "flops")
    kind = kind if kind in ("flops", "params") else "flops"  # a latency target: the rows' FLOPs vs the base
    key, label = _metric(summary)
    rows: list[list[str]] = [["model", "FLOPs", "params", f"{kind} vs base", label, "blocks/stage",
                              "stage widths"]]
    for r in summary.get("rows", []):
        rel = f"{r[kind] / ref[kind]:.3f}" if ref.get(kind) else "-"
        rows.append([r["name"], _human(r["flops"]), _human(r["params"]), rel, _metric_text(key, r.get(key)),
                     stages_text(r.get("describe")), widths_text(r.get("describe"))])
    return format_table(rows, markdown)


def structure_table(groups: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Per searched group: full width -> kept width (and depth groups: blocks kept)."""
    rows = [["group", "kind", "full", "kept", "ratio"]]
    for g in groups:
        rows.append([g["name"], g["kind"], str(g["full"]), str(g["kept"]), f"{g['kept'] / max(1, g['full']):.2f}"])
    return format_table(rows, markdown)


def budget_lines(summary: dict[str, Any]) -> list[str]:
    """Target, achieved value and how far the projection moved the allocation (search), and what each baseline
    reached (one common kept ratio, no projection)."""
    t = summary.get("target", {})
    kind = t.get("resource")
    if kind == "latency":
        out = [f"target: latency <= {1e3 * t.get('seconds', 0):.4g} ms per forward of a batch of "
               f"{t.get('batch_size')} on {t.get('device')}"]
    else:
        out = [f"target: {kind} <= {t.get('fraction')} of the {t.get('of')} model"]
    sr = summary.get("search")
    if sr:
        if sr.get("enlargement"):
            out.append(f"supernet: {sr['enlargement']}")
        got, goal = sr.get("resource_fraction_of_supernet", 0.0), sr.get("target_fraction_of_supernet", 0.0)
        rel = f" ({got / goal - 1:+.2%} of target)" if goal else ""
        out.append(f"search: {sr.get('steps')} steps in {sr.get('seconds')} s; achieved {kind} {got:.4f} of the "
                   f"supernet, target {goal:.4f}{rel}")
        lat = sr.get("latency")
        if lat:
            measured = f", measured {1e3 * lat['measured_s']:.4g} ms" if "measured_s" in lat else ""
            out.append(f"latency: predicted {1e3 * lat['predicted_s']:.4g} ms{measured} (supernet "
                       f"{1e3 * lat['supernet_s']:.4g} ms, target {1e3 * lat['target_s']:.4g} ms) on {lat['device']}, "
                       f"batch {lat['batch_size']}")
        p = sr.get("projection")
        if p:
            extra = ""
            if "moved" in p:
                extra = (f", resource moved {p['moved']:+.2%}; {p['groups_changed']} group(s) changed, mean width "
                         f"shift {p['shift']:.1%}" + ("" if p.get("tier", "width") == "width" else
                                                      f", {p['tier']} moved too")
                         + ("" if p.get("ok", True) else "; NOT within tolerance: search space too coarse"))
            out.append(f"projection onto the budget: {p['before']:.4f} -> {p['after']:.4f} of the supernet{extra}")
        elif "projection" in sr:
            out.append("projection onto the budget: none (off)")
    ref = summary.get("reference") or {}
    key, label = _metric(summary)
    for r in summary.get("rows", []):
        if not r.get("baseline"):
            continue
        rel = f"{r[kind] / ref[kind]:.4f} of the base model" if kind in ("flops", "params") and ref.get(kind) else "-"
        how = (f"common kept ratio {r['ratio']:.3f}" if "ratio" in r else
               f"width multiplier {r['width_mult']:.3f}" if "width_mult" in r else "")
        line = f"baseline {r['baseline']}: achieved {kind} {rel}" + (f"; {how}" if how else "")
        if "before_retrain" in r:
            bn = r.get("bn_recalibrated") or 0
            line += (f"; {label} before retraining {_metric_text(key, r['before_retrain'])} "
                     + (f"(BatchNorm recalibrated on {bn} batches)" if bn else "(no BatchNorm recalibration)"))
        out.append(line)
    return out


def render(summary: dict[str, Any], markdown: bool = False) -> str:
    """The end-of-run text: dataset, target, results table and structure table."""
    ds = summary.get("dataset", {})
    out = []
    h = "## " if markdown else ""
    out.append(f"{h}dmscale run: pipeline {summary.get('pipeline')}")
    out.append("")
    if ds.get("kind") == "text":
        out.append(f"data: {ds.get('name')} ({ds.get('selection', '')}; {ds.get('train')} training windows of "
                   f"{ds.get('seq_len')} tokens / {ds.get('test')} held-out tokens from {ds.get('source')})")
    else:
        out.append(f"dataset: {ds.get('name')} ({ds.get('selection', '')}; {ds.get('train')} train / "
                   f"{ds.get('test')} test images from {ds.get('source')})")
    if summary.get("model"):
        out.append(f"model: {summary['model']}")
    out.extend(budget_lines(summary))
    out.append("")
    out.append(results_table(summary, markdown))
    if summary.get("groups"):
        out.append("")
        out.append(f"{h}structure found (per group: full -> kept)" if markdown else "structure found:")
        out.append("")
        out.append(structure_table(summary["groups"], markdown))
    return "\n".join(out)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's log.jsonl."""
    p = Path(run_dir) / "log.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text("utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_resource(records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Resource (fraction of the supernet) vs search step, with the target schedule."""
    recs = [r for r in records if r.get("phase") == "search" and "resource" in r]
    if not recs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["resource"] for r in recs], label="resource (hard-count)")
    ax.plot(steps, [r["target"] for r in recs], "--", label="target schedule")
    ax.set_xlabel("search step")
    ax.set_ylabel("fraction of supernet")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_widths(groups: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Bar chart per group: full vs kept width (depth groups: blocks)."""
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(groups)), 4))
    xs = list(range(len(groups)))
    ax.bar(xs, [g["full"] for g in groups], color="#cccccc", label="full")
    ax.bar(xs, [g["kept"] for g in groups], color="#1f77b4", label="kept")
    ax.set_xticks(xs)
    ax.set_xticklabels([g["name"] for g in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("channels / blocks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_acc_flops(rows: Sequence[dict[str, Any]], path: str | Path, key: str = "acc",
                   label: str = "test acc") -> Path | None:
    """The metric (accuracy by default) vs FLOPs: the found model(s) against the baselines and the base model."""
    pts = [r for r in rows if r.get(key) is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
        marker = "*" if r.get("dms") else ("s" if r.get("baseline") else "o")
        size = 160 if r.get("dms") else 60
        y = 100 * r[key] if key == "acc" else r[key]
        ax.scatter([r["flops"] / 1e6], [y], marker=marker, s=size, label=r["name"])
    ax.set_xlabel("MFLOPs per example")
    ax.set_ylabel("test accuracy (%)" if key == "acc" else label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(run_dir: str | Path, summary: dict[str, Any]) -> str:
    """Write report.md and the PNG plots into the run directory; returns the report text."""
    run_dir = Path(run_dir)
    recs = read_log(run_dir)
    pics = []
    if plot_resource(recs, run_dir / "resource.png"):
        pics.append(("resource vs step with the target schedule", "resource.png"))
    if plot_widths(summary.get("groups", []), run_dir / "widths.png"):
        pics.append(("kept width per group (full vs kept)", "widths.png"))
    key, label = _metric(summary)
    if plot_acc_flops(summary.get("rows", []), run_dir / "acc_flops.png", key, label):
        pics.append((f"{label} vs FLOPs (found model vs baselines)", "acc_flops.png"))
    text = render(summary, markdown=True)
    if pics:
        text += "\n\n## plots\n\n" + "\n".join(f"![{t}]({f})" for t, f in pics)
    atomic_write_text(run_dir / "report.md", text + "\n")
    return text
