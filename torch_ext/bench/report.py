"""Outputs of a run: terminal table, JSON file, per-family PNG plots.

All functions take the case records built by the runner (plain dicts, the same
content as the JSON), so they can also be used on a JSON file loaded later.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter


def format_table(cases: list[dict[str, Any]]) -> str:
    """One aligned table per op family; a family's columns cover all of its baselines."""
    blocks = []
    for family in _unique(c["family"] for c in cases):
        rows = [c for c in cases if c["family"] == family]
        baselines = _unique(name for c in rows for name in c.get("baselines", {}))
        header = ["family", "op", "device", "label", "ours (us)"]
        for name in baselines:
            header += [f"{name} (us)", "ratio"]
        header += ["GB/s", "TFLOP/s", "%roof"]
        body = [_table_row(c, baselines) for c in rows]
        blocks.append(_align([header] + body, numeric_from=4))
    return "\n\n".join(blocks)


def _table_row(case: dict[str, Any], baselines: list[str]) -> list[str]:
    # A case-level error (e.g. make_inputs failed) leaves no "ours" entry.
    ours = case.get("ours") or ({"error": case["error"]} if "error" in case else {})
    row = [case["family"], case["op"], case["device"], case["label"], _us(ours)]
    for name in baselines:
        result = case.get("baselines", {}).get(name)
        if result is None:
            row += ["", ""]
        else:
            row += [_us(result), _num(result.get("speedup"), "{:.2f}x")]
    tflops = ours.get("tflops") if case.get("flops") else None
    row += [
        _num(ours.get("gbs"), "{:.1f}"),
        _num(tflops, "{:.2f}"),
        _num(ours.get("roofline_pct"), "{:.0f}%"),
    ]
    return row


def _us(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERR"
    value = result.get("median_us")
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _align(rows: list[list[str]], numeric_from: int) -> str:
    """Left-align text columns, right-align columns from ``numeric_from`` on."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_errors(result: dict[str, Any]) -> list[str]:
    """One line per recorded error (suite build, plots, case, ours or a baseline)."""
    lines = [f"error: {e['where']}: {e['error']}" for e in result.get("errors", ())]
    for case in result.get("cases", []):
        where = f"{case['family']}/{case['op']} [{case['label']}] on {case['device']}"
        if "error" in case:
            lines.append(f"error: {where}: {case['error']}")
        if "error" in (case.get("ours") or {}):
            lines.append(f"error: {where}, ours: {case['ours']['error']}")
        for name, res in case.get("baselines", {}).items():
            if "error" in res:
                lines.append(f"error: {where}, {name}: {res['error']}")
    return lines


def write_json(result: dict[str, Any], out_dir: Path, stamp: str, replace: bool = False) -> Path:
    """Write ``out_dir/bench-<stamp>.json`` (suffixing ``-2``, ``-3``, ... if it exists, unless
    `replace`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{stamp}.json"
    suffix = 2
    while path.exists() and not replace:
        path = out_dir / f"bench-{stamp}-{suffix}.json"
        suffix += 1
    path.write_text(json.dumps(_finite(result), indent=2) + "\n")
    return path


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_plots(cases: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One ``<family>-<device>.png`` per (family, device) with at least one measured case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for family, device in _unique((c["family"], c["device"]) for c in cases):
        group = [
            c for c in cases
            if c["family"] == family and c["device"] == device and "median_us" in (c.get("ours") or {})
        ]
        if not group:
            continue
        path = out_dir / f"{family}-{device.replace(':', '')}.png"
        plot_family(group, f"{family} on {device}", path)
        paths.append(path)
    return paths


def plot_family(cases: list[dict[str, Any]], title: str, path: Path) -> None:
    """Two panels: speed-up of ours vs each baseline per shape, and % of roofline of ours."""
    several_ops = len({c["op"] for c in cases}) > 1
    labels = [f"{c['op']}\n{c['label']}" if several_ops else c["label"] for c in cases]
    baselines = _unique(name for c in cases for name in c.get("baselines", {}))
    xs = list(range(len(cases)))

    fig = Figure(figsize=(max(8.0, 1.1 * len(cases) + 3.0), 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    speed_ax, roof_ax = fig.subplots(2, 1)
    fig.suptitle(title)

    width = 0.8 / max(1, len(baselines))
    any_ratio = False
    for i, name in enumerate(baselines):
        ratios = [_nan((c.get("baselines", {}).get(name) or {}).get("speedup")) for c in cases]
        any_ratio = any_ratio or any(r > 0 for r in ratios)  # NaN compares False
        offsets = [x - 0.4 + width * (i + 0.5) for x in xs]
        # Bars grow from 1.0, up when ours is faster and down when it is slower.
        bars = speed_ax.bar(offsets, [r - 1.0 for r in ratios], width, bottom=1.0, label=f"vs {name}")
        texts = ["" if math.isnan(r) else f"{r:.2f}x" for r in ratios]
        speed_ax.bar_label(bars, labels=texts, fontsize=7)
    speed_ax.axhline(1.0, color="black", linewidth=1)
    if any_ratio:  # a log axis without positive data makes matplotlib warn
        speed_ax.set_yscale("log", base=2)  # ticks at 0.5x, 1x, 2x, 4x, ...
        speed_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        speed_ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    speed_ax.set_ylabel("speed-up (baseline time / ours)")
    speed_ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    if baselines:
        speed_ax.legend(fontsize=8)

    roof_ax.bar(xs, [_nan(c["ours"].get("roofline_pct")) for c in cases], 0.6, color="tab:green")
    roof_ax.axhline(100.0, color="black", linewidth=1, linestyle="--")
    roof_ax.set_ylabel("ours: % of roofline")
    roof_ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)

    fig.savefig(path, dpi=100)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _unique(items: Any) -> list[Any]:
    """Distinct items in first-seen order."""
    return list(dict.fromkeys(items))
