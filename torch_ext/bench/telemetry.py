"""GPU telemetry: NVML access, a background power/clock sampler, peak CUDA memory.

Everything degrades silently: without ``pynvml`` (nvidia-ml-py), without an
NVML library, or for unsupported queries, the affected fields are omitted and
the summary says ``"nvml": "unavailable"``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

_nvml_module: Any = None  # the initialised pynvml module, or False once it failed


def nvml() -> Any | None:
    """The initialised ``pynvml`` module, or ``None`` if NVML cannot be used."""
    global _nvml_module
    if _nvml_module is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_module = pynvml
        except Exception:
            _nvml_module = False
    return _nvml_module or None


def cuda_index(device: torch.device) -> int:
    """CUDA ordinal of ``device`` (the current device for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def pci_bus_id(device: torch.device) -> str | None:
    """PCI bus id (``"00000000:65:00.0"``) of a CUDA device, as NVML and nvidia-smi accept it."""
    props = torch.cuda.get_device_properties(cuda_index(device))
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return None


def nvml_handle(device: torch.device) -> Any | None:
    """NVML handle of a CUDA device, matched by PCI bus id (CUDA and NVML orderings can differ)."""
    lib = nvml()
    if lib is None:
        return None
    bus_id = pci_bus_id(device)
    try:
        if bus_id is not None:
            # bytes: older pynvml versions pass the argument straight to ctypes.
            return lib.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
        # Without a bus id the ordinals only agree if CUDA_VISIBLE_DEVICES does not remap them.
        if "CUDA_VISIBLE_DEVICES" not in os.environ:
            return lib.nvmlDeviceGetHandleByIndex(cuda_index(device))
    except Exception:
        pass
    return None


def read_sample(lib: Any, handle: Any) -> dict[str, float]:
    """One reading of power (W), SM/memory clocks (MHz) and temperature (C); unsupported ones omitted."""
    readers = {
        "power_w": lambda: lib.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "sm_clock_mhz": lambda: lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda: lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_MEM),
        "temperature_c": lambda: lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU),
    }
    sample = {}
    for key, read in readers.items():
        try:
            sample[key] = float(read())
        except Exception:
            continue
    return sample


def _energy_mj(lib: Any, handle: Any) -> float | None:
    """Total energy counter in millijoules (Volta and later), or ``None``."""
    try:
        return float(lib.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:
        return None


class GpuSampler:
    """Context manager polling NVML on a background thread while the timed loop runs."""

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self._device = device
        self._interval_s = interval_s
        self._lib = nvml()
        self._handle = nvml_handle(device) if self._lib is not None else None
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_start: float | None = None
        self._energy_end: float | None = None

    def __enter__(self) -> GpuSampler:
        if self._handle is not None:
            self._energy_start = _energy_mj(self._lib, self._handle)
            self._thread = threading.Thread(target=self._poll, name="bench-nvml", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            torch.cuda.synchronize(self._device)  # the window ends when the GPU work does
        finally:  # stop polling even if the op left a CUDA error behind
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._energy_end = _energy_mj(self._lib, self._handle)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._samples.append(read_sample(self._lib, self._handle))
            self._stop.wait(self._interval_s)

    def summary(self, reps: int, median_s: float, window_is_op_only: bool) -> dict[str, Any]:
        """Averages over the window and energy per op.

        Energy per op comes from the energy counter divided by ``reps`` when the
        timed window contained nothing but the op (``window_is_op_only``, e.g. no
        cache flush between repetitions); otherwise from average power times the
        median time.
        """
        if self._handle is None:
            return {"nvml": "unavailable"}
        out: dict[str, Any] = {"nvml": "ok", "samples": len(self._samples)}
        for key in ("power_w", "sm_clock_mhz", "mem_clock_mhz"):
            values = [s[key] for s in self._samples if key in s]
            if values:
                out[f"avg_{key}"] = sum(values) / len(values)
        temperatures = [s["temperature_c"] for s in self._samples if "temperature_c" in s]
        if temperatures:
            out["max_temperature_c"] = max(temperatures)
        if window_is_op_only and self._energy_start is not None and self._energy_end is not None:
            out["energy_per_op_j"] = (self._energy_end - self._energy_start) / 1000.0 / reps
            out["energy_method"] = "energy counter delta / reps"
        elif "avg_power_w" in out:
            out["energy_per_op_j"] = out["avg_power_w"] * median_s
            out["energy_method"] = "average power x median time"
        return out


class PeakMemory:
    """Context manager recording peak CUDA memory allocated while active."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._start = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        torch.cuda.synchronize(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        self._start = torch.cuda.memory_allocated(self._device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        torch.cuda.synchronize(self._device)
        self._peak = torch.cuda.max_memory_allocated(self._device)

    def to_json(self) -> dict[str, int]:
        """Peak bytes allocated, and the part above what was allocated on entry (outputs, workspace)."""
        return {"peak_allocated_bytes": self._peak, "peak_above_start_bytes": self._peak - self._start}
