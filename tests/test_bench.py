"""Tests of the benchmark harness (torch_ext.bench) with a synthetic suite.

They do not need the compiled extension's ops: the synthetic "selftest" suite
compares torch.add with torch.sub and is registered only inside
``isolated_registry`` so it never leaks into other runs.
"""

import json
import os
import time

import pytest
import torch

# The harness itself does not need the compiled ops.
os.environ.setdefault("TORCH_EXT_ALLOW_MISSING_EXT", "1")

from torch_ext.bench import (
    Case,
    isolated_registry,
    main,
    register_suite,
    registered_suites,
    run,
    unregister_suite,
)
from torch_ext.bench.roofline import Roofline, achieved, inputs_dtype, roofline_percent
from torch_ext.bench.runner import speedup
from torch_ext.bench.suites.activation import activation_suite, silu_and_mul_torch
from torch_ext.bench.timer import InputSets, Stats, TimerConfig, measure, prepare_inputs, sets_needed

MB = 2**20
FAST = TimerConfig(budget_s=0.01, warmup_s=0.002)


def _selftest_suite(broken_baseline: bool = False, working_set_bytes: int | None = None):
    """Suite factory: add (ours) vs sub (baseline), optionally with a baseline that raises and
    a declared working set."""

    def suite(device: str, quick: bool) -> list[Case]:
        def make_inputs(seed: int) -> tuple:
            gen = torch.Generator(device=device).manual_seed(seed)
            return tuple(torch.randn(256, 256, generator=gen, device=device) for _ in range(2))

        def broken(a, b):
            raise RuntimeError("intentional failure")

        baselines = {"sub": torch.sub}
        if broken_baseline:
            baselines["broken"] = broken
        return [
            Case(
                family="selftest",
                op="selftest_add",
                label="256x256 fp32",
                make_inputs=make_inputs,
                ours=torch.add,
                baselines=baselines,
                flops=256 * 256,
                bytes=3 * 256 * 256 * 4,
                device=device,
                working_set_bytes=working_set_bytes,
            )
        ]

    return suite


def test_stats_from_samples():
    stats = Stats.from_samples([float(i) for i in range(1, 101)])
    assert stats.reps == 100
    assert stats.median_s == pytest.approx(50.5)
    assert stats.p10_s == pytest.approx(10.9)
    assert stats.p90_s == pytest.approx(90.1)
    assert stats.min_s == 1.0
    assert stats.mean_s == pytest.approx(50.5)
    assert stats.to_json()["median_us"] == pytest.approx(50.5e6)
    with pytest.raises(ValueError):
        Stats.from_samples([])


def test_sets_needed():
    assert sets_needed(1 * MB, 32 * MB, 10**12) == 8  # capped
    assert sets_needed(10 * MB, 16 * MB, 10**12) == 4  # ceil(2 * 16 / 10)
    assert sets_needed(100 * MB, 32 * MB, 10**12) == 1
    assert sets_needed(4 * MB, 32 * MB, 40 * MB) == 2  # a quarter of free memory
    assert sets_needed(0, 32 * MB, 10**12) == 1


def test_prepare_inputs_rotates_distinct_sets():
    inputs = prepare_inputs(lambda seed: (torch.full((4,), float(seed)),), "cpu")
    assert len(inputs.sets) == 8  # tiny sets: capped count
    assert inputs.flush is None  # never on CPU
    assert [inputs.args(i)[0][0].item() for i in range(9)] == [0, 1, 2, 3, 4, 5, 6, 7, 0]


def test_measure_counts_and_order():
    inputs = prepare_inputs(lambda seed: (torch.randn(64),), "cpu")
    stats = measure(torch.neg, inputs, FAST)
    assert FAST.min_reps <= stats.reps <= FAST.max_reps
    assert 0 < stats.min_s <= stats.p10_s <= stats.median_s <= stats.p90_s


def test_measure_respects_min_reps_and_rotates():
    seen = []

    def slow(x):
        seen.append(int(x.item()))
        time.sleep(0.005)

    stats = measure(slow, InputSets([(torch.tensor(0),), (torch.tensor(1),)], torch.device("cpu")), FAST)
    assert stats.reps == FAST.min_reps  # budget smaller than one call
    assert stats.median_s >= 0.005
    assert set(seen[-stats.reps :]) == {0, 1}


def test_roofline_arithmetic():
    roof = Roofline(device="cpu", bandwidth_gbs=100.0, peak_tflops={"float32": 10.0})
    assert achieved(1e11, 1e9, 0.02) == pytest.approx((5.0, 50.0))
    # bandwidth-bound: 50 GB/s of 100
    assert roofline_percent(roof, 0.0, 1e9, 0.02, "float32") == pytest.approx(50.0)
    # compute fraction (80%) beats bandwidth fraction (50%)
    assert roofline_percent(roof, 1.6e11, 1e9, 0.02, "float32") == pytest.approx(80.0)
    # no peak for this dtype: bandwidth only
    assert roofline_percent(roof, 1.6e11, 1e9, 0.02, "int8") == pytest.approx(50.0)
    assert roofline_percent(Roofline("cpu", None), 0.0, 1e9, 0.02, None) is None
    assert speedup(2.0, 1.0) == 2.0
    assert speedup(1.0, 4.0) == 0.25


def test_inputs_dtype():
    ints = torch.zeros(2, dtype=torch.int8)
    assert inputs_dtype((ints, [torch.zeros(2, dtype=torch.bfloat16)], torch.zeros(2))) == torch.bfloat16
    assert inputs_dtype((ints, 3)) is None


def test_registry_isolation():
    before = registered_suites()
    with isolated_registry():
        register_suite("selftest")(_selftest_suite())
        assert "selftest" in registered_suites()
        with pytest.raises(ValueError):
            register_suite("selftest")(lambda device, quick: [])  # a different function
        unregister_suite("selftest")
        assert "selftest" not in registered_suites()
        register_suite("selftest")(_selftest_suite())
    assert registered_suites() == before


def test_run_writes_json_and_plots(tmp_path, capsys):
    with isolated_registry():
        register_suite("selftest")(_selftest_suite(broken_baseline=True))
        result = run(ops=["selftest"], quick=True, out_dir=str(tmp_path))
    assert "selftest" not in registered_suites()

    json_files = list(tmp_path.glob("bench-*.json"))
    assert len(json_files) == 1
    data = json.loads(json_files[0].read_text())
    assert data == json.loads(json.dumps(result))
    assert {"environment", "roofline", "cases", "settings", "errors", "plots"} <= data.keys()
    assert data["settings"]["quick"] is True
    assert {"timestamp_utc", "torch", "cpu", "build_info"} <= data["environment"].keys()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert sorted(data["roofline"]) == sorted(devices)
    assert data["roofline"]["cpu"]["bandwidth_gbs"] > 0
    assert data["roofline"]["cpu"]["peak_tflops"]["float32"] > 0
    for device in devices:
        assert (tmp_path / f"selftest-{device}.png").stat().st_size > 0

    assert len(data["cases"]) == len(devices)
    case = data["cases"][0]
    assert case["family"] == "selftest" and case["op"] == "selftest_add"
    assert case["dtype"] == "float32"
    assert case["input_sets"] >= 1
    ours = case["ours"]
    expected = {"median_us", "p10_us", "p90_us", "min_us", "reps", "gbs", "tflops", "roofline_pct"}
    assert expected <= ours.keys()
    sub = case["baselines"]["sub"]
    assert sub["speedup"] == pytest.approx(sub["median_us"] / ours["median_us"])
    assert case["speedup"] == sub["speedup"]  # "sub" is the primary (first) baseline
    assert ours["gbs"] == pytest.approx(case["bytes"] / ours["median_us"] / 1e3)
    assert "intentional failure" in case["baselines"]["broken"]["error"]

    out = capsys.readouterr().out
    assert "selftest_add" in out and "sub (us)" in out and "ERR" in out
    assert out.rstrip().splitlines()[-1].endswith(str(json_files[0]))


def test_run_selects_by_op_name_and_rejects_unknown(tmp_path):
    with isolated_registry():
        register_suite("selftest")(_selftest_suite())
        result = run(ops=["selftest_add"], quick=True, out_dir=str(tmp_path), devices=["cpu"])
        assert [c["op"] for c in result["cases"]] == ["selftest_add"]
        with pytest.raises(ValueError, match="no_such_op"):
            run(ops=["no_such_op"], quick=True, out_dir=str(tmp_path), devices=["cpu"])
        assert run(ops=["selftest"], quick=True, out_dir=str(tmp_path), devices=["cpu"], match="fp16")["cases"] == []
        assert len(run(ops=["selftest"], quick=True, out_dir=str(tmp_path), devices=["cpu"],
                       match="256x256")["cases"]) == 1
        assert len(run(ops=["selftest"], quick=True, out_dir=str(tmp_path), devices=["cpu"],
                       match=["fp16", "256x256"])["cases"]) == 1


def test_declared_working_set_decides_the_cpu_roofline(tmp_path):
    """Tiny inputs run from cache, unless the case says it rotates a larger working set itself."""
    roofs = {}
    for declared in (None, 1 << 40):
        with isolated_registry():
            register_suite("selftest")(_selftest_suite(working_set_bytes=declared))
            result = run(ops=["selftest"], quick=True, out_dir=str(tmp_path), devices=["cpu"])
        roofs[declared] = result["cases"][0]["bandwidth_roof"]
    assert roofs == {None: "cache", 1 << 40: "memory"}


def test_main_exit_codes(tmp_path):
    with isolated_registry():
        register_suite("selftest")(_selftest_suite())
        assert main(["--op", "selftest", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
        unregister_suite("selftest")
        register_suite("selftest")(_selftest_suite(broken_baseline=True))
        assert main(["--op", "selftest", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
        assert main(["--op", "no_such_op", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2


def test_profile_once_runs_only_cuda_cases(capsys):
    with isolated_registry():
        register_suite("selftest")(_selftest_suite())
        assert main(["--op", "selftest", "--quick", "--device", "cpu", "--profile-once"]) == 0
        assert "profiled" not in capsys.readouterr().out
        if not torch.cuda.is_available():
            assert main(["--op", "selftest", "--quick", "--profile-once"]) == 2
            assert "CUDA is not available" in capsys.readouterr().err
        else:
            assert main(["--op", "selftest", "--quick", "--profile-once"]) == 0
            assert "selftest_add" in capsys.readouterr().out


def test_activation_suite_cases():
    quick = [c for c in activation_suite("cpu", quick=True) if c.op == "silu_and_mul"]
    full_all = activation_suite("cpu", quick=False)
    full = [c for c in full_all if c.op == "silu_and_mul"]
    assert 1 <= len(quick) <= 3
    assert len(full) == 12  # 3 token counts x 2 widths x 2 dtypes
    backward = [c for c in full_all if c.op == "silu_and_mul_backward"]
    assert len(backward) == 1
    grad, x = (t[:4].double() for t in backward[0].make_inputs(0))  # the formula, checked in float64
    torch.testing.assert_close(backward[0].baselines["torch (eager formula)"](grad, x),
                               torch.ops.torch_ext.silu_and_mul_backward(grad, x))
    for case in full:
        assert (case.family, case.op, case.flops) == ("activation", "silu_and_mul", 0.0)
        assert case.primary_baseline == "torch (F.silu(a) * b)"
    case = quick[0]
    (x,) = case.make_inputs(0)
    tokens, two_d = x.shape
    assert case.bytes == (tokens * two_d + tokens * two_d // 2) * x.element_size()
    assert not torch.equal(x, case.make_inputs(1)[0])
    a, b = x[:, : two_d // 2], x[:, two_d // 2 :]
    torch.testing.assert_close(silu_and_mul_torch(x), a * torch.sigmoid(a) * b)


class _FakeNvml:
    """Minimal stand-in for pynvml: constant readings, energy counter +1 J per read."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0

    def __init__(self):
        self.energy_mj = 0.0

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # mW

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980 if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle, sensor):
        raise RuntimeError("not supported")  # unsupported readings are skipped

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.energy_mj += 1000.0
        return self.energy_mj


def test_gpu_sampler_summary(monkeypatch):
    from torch_ext.bench import telemetry

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(telemetry, "nvml", lambda: _FakeNvml())
    monkeypatch.setattr(telemetry, "nvml_handle", lambda device: "handle")
    with telemetry.GpuSampler(torch.device("cuda"), interval_s=0.005) as sampler:
        time.sleep(0.03)
    summary = sampler.summary(reps=10, median_s=0.002, window_is_op_only=True)
    assert summary["nvml"] == "ok" and summary["samples"] >= 1
    assert summary["avg_power_w"] == pytest.approx(250.0)
    assert summary["avg_sm_clock_mhz"] == 1980 and summary["avg_mem_clock_mhz"] == 2619
    assert "max_temperature_c" not in summary
    assert summary["energy_per_op_j"] == pytest.approx(0.1)  # 1 J over 10 reps
    flushed = sampler.summary(reps=10, median_s=0.002, window_is_op_only=False)
    assert flushed["energy_per_op_j"] == pytest.approx(0.5)  # 250 W x 2 ms

    monkeypatch.setattr(telemetry, "nvml", lambda: None)
    with telemetry.GpuSampler(torch.device("cuda")) as unavailable:
        pass
    summary = unavailable.summary(reps=10, median_s=0.002, window_is_op_only=True)
    assert summary == {"nvml": "unavailable"}


def test_on_amx_tiles_times_both_sides_of_the_switch(monkeypatch):
    """The AMX variant of a case: ours under mode "on", the case's own op under "off" as one more
    baseline, the mode restored after each call (set_cpu_amx faked: no AMX CPU needed)."""
    torch_ext = pytest.importorskip("torch_ext")
    from torch_ext.bench.case import on_amx_tiles

    mode, seen = ["off"], []
    monkeypatch.setattr(torch_ext._C, "cpu_amx", lambda: mode[0])
    monkeypatch.setattr(torch_ext._C, "set_cpu_amx", lambda m: mode.__setitem__(0, m))
    case = Case(family="selftest", op="add", label="x", make_inputs=lambda seed: (),
                ours=lambda: seen.append(mode[0]), baselines={"sub": lambda: seen.append("sub")})
    amx = on_amx_tiles(case, "add on the default kernel")
    assert amx.op == "add AMX" and list(amx.baselines) == ["sub", "add on the default kernel"]
    assert amx.primary_baseline == "sub"
    mode[0] = "emulate"
    amx.ours()
    amx.baselines["add on the default kernel"]()
    assert seen == ["on", "off"] and mode[0] == "emulate"
