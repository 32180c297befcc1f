"""Running the registered suites: case selection, measurement, outputs, CLI."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .case import Case, registered_suites
from .environment import collect_environment
from .report import format_errors, format_table, write_json, write_plots
from .roofline import Roofline, achieved, dtype_name, inputs_dtype, measure_roofline, roofline_percent
from .telemetry import GpuSampler, PeakMemory
from .timer import (InputSets, Stats, TimerConfig, last_level_cache_bytes, measure, prepare_inputs,
                    tensor_bytes)


def run(
    ops: list[str] | None = None,
    quick: bool = False,
    out_dir: str = "bench_results",
    devices: list[str] | None = None,
    match: str | list[str] | None = None,
) -> dict[str, Any]:
    """Benchmark the selected cases, print a table, write JSON and plots; return the result dict.

    Args:
        ops: family or op names to run (``None``: everything registered).
        quick: small subset of shapes and short measurements.
        out_dir: where ``bench-<UTC timestamp>.json`` and ``<family>-<device>.png`` go.
        devices: devices to run on (default: ``cpu``, plus ``cuda`` when available).
        match: keep only the cases whose label contains this text (e.g. ``"S=8192"``), or any
            of these texts.

    Raises:
        ValueError: unknown device, CUDA requested but unavailable, or a name in
            ``ops`` that matches no family and no op.
    """
    devices = _resolve_devices(devices)
    environment = collect_environment(devices)
    cases, errors = _select_cases(devices, ops, quick, match)

    config = TimerConfig.for_mode(quick)
    rooflines: dict[str, Roofline] = {}
    records = []
    out = Path(out_dir)
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr, disable=None, leave=False):
        if case.device not in rooflines:
            rooflines[case.device] = measure_roofline(case.device, quick)
        records.append(measure_case(case, rooflines[case.device], config))
        # As it goes: a run stopped at a time limit (the lent GPU's) keeps what it measured.
        print(_progress_line(records[-1]), flush=True)
        write_json({"environment": environment, "cases": records, "errors": errors}, out, "partial", replace=True)

    result: dict[str, Any] = {
        "environment": environment,
        "settings": {
            "quick": quick,
            "match": match,
            "argv": list(sys.argv),
            "ops": ops,
            "devices": devices,
            "out_dir": str(out),
        },
        "roofline": {device: roof.to_json() for device, roof in rooflines.items()},
        "cases": records,
        "errors": errors,
    }
    try:
        result["plots"] = [str(p) for p in write_plots(records, out)]
    except Exception as exc:  # plots are a convenience: never lose the JSON over them
        result["plots"] = []
        errors.append({"where": "plots", "error": _describe(exc)})
    stamp = environment["timestamp_utc"].replace("-", "").replace(":", "")
    json_path = write_json(result, out, stamp)
    (out / "bench-partial.json").unlink(missing_ok=True)  # superseded by the complete file

    print(format_table(records) if records else "no cases selected")
    for line in format_errors(result):
        print(line)
    print(f"bench: results written to {json_path}")
    return result


def _progress_line(record: dict[str, Any]) -> str:
    """``label: ours 123.4 us | baseline 456.7 us (3.70x) | ...`` (medians)."""
    def median(res: dict[str, Any] | None) -> float | None:
        return None if not res or "error" in res else res.get("median_us")

    ours = median(record.get("ours"))
    parts = [f"{record['label']}: ours " + (f"{ours:.1f} us" if ours else "error")]
    for name, res in record.get("baselines", {}).items():
        base = median(res)
        parts.append(f"{name} " + (f"{base:.1f} us" + (f" ({base / ours:.2f}x)" if ours else "") if base else "error"))
    return "  " + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m torch_ext bench ...``); 0 on success, 1 if any case failed."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_ext bench",
        description="Benchmark torch_ext ops against PyTorch baselines.",
    )
    parser.add_argument(
        "--op", dest="ops", action="extend", nargs="+", metavar="NAME",
        help="op family (e.g. activation) or op name (e.g. silu_and_mul); repeatable; default: all",
    )
    parser.add_argument("--quick", action="store_true", help="few shapes, short measurements")
    parser.add_argument("--match", metavar="TEXT", action="append",
                        help="only the cases whose label contains TEXT; repeatable (any of them)")
    parser.add_argument("--out", default="bench_results", metavar="DIR", help="output directory")
    parser.add_argument("--profile-once", action="store_true",
                        help="no timing: run our op once per CUDA case inside the profiler window (under ncu)")
    parser.add_argument(
        "--device", dest="devices", action="append", choices=("cpu", "cuda"),
        help="repeatable; default: cpu, plus cuda when available",
    )
    args = parser.parse_args(argv)
    try:
        if args.profile_once:
            return _profile_once(args)
        result = run(ops=args.ops, quick=args.quick, out_dir=args.out, devices=args.devices, match=args.match)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if format_errors(result) else 0


def _profile_once(args: argparse.Namespace) -> int:
    from .profile_once import profile_once

    cases, errors = _select_cases(_resolve_devices(args.devices or ["cuda"]), args.ops, args.quick, args.match)
    for error in errors:
        print(f"error: {error['where']}: {error['error']}", file=sys.stderr)
    return profile_once(cases) or int(bool(errors))


def _select_cases(devices: list[str], ops: list[str] | None, quick: bool,
                  match: str | list[str] | None) -> tuple[list[Case], list[dict[str, str]]]:
    importlib.import_module(f"{__package__}.suites")  # registers the built-in suites
    cases, errors = _collect_cases(devices, ops, quick)
    patterns = [match] if isinstance(match, str) else match
    return [c for c in cases if patterns is None or any(p in c.label for p in patterns)], errors


def speedup(baseline_s: float, ours_s: float) -> float:
    """Baseline time over our time: above 1 means ours is faster."""
    return baseline_s / ours_s


def measure_case(case: Case, roof: Roofline, config: TimerConfig) -> dict[str, Any]:
    """Measure ours and every baseline of ``case``; failures are recorded, never raised."""
    record: dict[str, Any] = {
        "family": case.family,
        "op": case.op,
        "label": case.label,
        "device": case.device,
        "flops": case.flops,
        "bytes": case.bytes,
        "primary_baseline": case.primary_baseline,
        "notes": dict(case.notes),
    }
    try:
        inputs = prepare_inputs(case.make_inputs, case.device)
    except Exception as exc:
        record["error"] = f"make_inputs failed: {_describe(exc)}"
        return record
    try:
        dtype = case.compute_dtype or inputs_dtype(inputs.sets[0])
        record["dtype"] = dtype_name(dtype) if dtype is not None else None
        record["input_sets"] = len(inputs.sets)
        record["cache_flush"] = inputs.flush is not None
        # CPU cases whose rotated inputs fit in the last-level cache run from cache: their
        # % of roofline is taken against the measured cache bandwidth, not DRAM's.
        working_set = (case.working_set_bytes if case.working_set_bytes is not None
                       else len(inputs.sets) * tensor_bytes(inputs.sets[0]))
        cache_resident = (torch.device(case.device).type == "cpu" and
                          working_set <= last_level_cache_bytes(torch.device("cpu")))
        record["bandwidth_roof"] = "cache" if cache_resident else "memory"

        def evaluate(stats: Stats) -> dict[str, Any]:
            tflops, gbs = achieved(case.flops, case.bytes, stats.median_s)
            pct = roofline_percent(roof, case.flops, case.bytes, stats.median_s, record["dtype"], cache_resident)
            return {**stats.to_json(), "tflops": tflops, "gbs": gbs, "roofline_pct": pct}

        ours_stats, ours = _measure_ours(case, inputs, config)
        record["ours"] = ours if ours_stats is None else {**evaluate(ours_stats), **ours}
        record["baselines"] = {}
        for name, fn in case.baselines.items():
            try:
                stats, memory = _measure_baseline(fn, inputs, config)
            except Exception as exc:
                record["baselines"][name] = {"error": _describe(exc)}
                continue
            entry = {**evaluate(stats), **memory}
            if ours_stats is not None:
                entry["speedup"] = speedup(stats.median_s, ours_stats.median_s)
            record["baselines"][name] = entry
        primary = record["baselines"].get(case.primary_baseline or "", {})
        record["speedup"] = primary.get("speedup")
    finally:
        del inputs
        if torch.device(case.device).type == "cuda":
            # Keeps free-memory estimates honest for the next case. After a sticky
            # CUDA error this raises too; the error is already recorded above.
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return record


def _measure_baseline(fn: Any, inputs: InputSets, config: TimerConfig) -> tuple[Stats, dict[str, int]]:
    """Time a baseline; on CUDA also its peak memory, to compare workspaces with ours."""
    if inputs.device.type != "cuda":
        return measure(fn, inputs, config), {}
    with PeakMemory(inputs.device) as memory:
        stats = measure(fn, inputs, config)
    return stats, memory.to_json()


def _measure_ours(
    case: Case, inputs: InputSets, config: TimerConfig
) -> tuple[Stats | None, dict[str, Any]]:
    """Time ``case.ours``; on CUDA also sample NVML and peak memory. Returns (stats, extra fields)."""
    try:
        if inputs.device.type != "cuda":
            return measure(case.ours, inputs, config), {}
        sampler = GpuSampler(inputs.device)
        with PeakMemory(inputs.device) as memory:
            stats = measure(case.ours, inputs, config, timed_context=sampler)
        # With a flush between repetitions the energy counter also counts the flush writes.
        telemetry = sampler.summary(stats.reps, stats.median_s, window_is_op_only=inputs.flush is None)
        return stats, {"telemetry": {**telemetry, **memory.to_json()}}
    except Exception as exc:
        return None, {"error": _describe(exc)}


def _resolve_devices(devices: list[str] | None) -> list[str]:
    if devices is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    resolved = []
    for name in dict.fromkeys(devices):
        kind = torch.device(name).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"unsupported device {name!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        resolved.append(name)
    return resolved


def _collect_cases(
    devices: list[str], ops: list[str] | None, quick: bool
) -> tuple[list[Case], list[dict[str, str]]]:
    """Build the selected cases; suite failures become error records."""
    suites = registered_suites()
    wanted = set(ops or ())
    # Only names that are not families need every suite built (to look for the op).
    build_all = ops is None or bool(wanted - suites.keys())
    selected = {f: fn for f, fn in suites.items() if build_all or f in wanted}
    cases: list[Case] = []
    errors: list[dict[str, str]] = []
    for device in devices:
        for family, build in selected.items():
            try:
                built = build(device, quick)
            except Exception as exc:
                errors.append({"where": f"suite {family} on {device}", "error": _describe(exc)})
                continue
            cases += [c for c in built if ops is None or c.family in wanted or c.op in wanted]
    unknown = wanted - suites.keys() - {c.op for c in cases}
    if unknown and not errors:  # with a failed suite the name may belong to it
        known_ops = sorted({c.op for c in cases})
        raise ValueError(
            f"unknown op or family {sorted(unknown)}; families: {sorted(suites)}"
            + (f", ops: {known_ops}" if known_ops else "")
        )
    return cases, errors


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."

