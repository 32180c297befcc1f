"""Description of the machine and software a benchmark ran on."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .telemetry import cuda_index, nvml, nvml_handle, pci_bus_id, read_sample

_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def collect_environment(devices: list[str]) -> dict[str, Any]:
    """Environment dict: host, software versions, CPU, and one entry per CUDA device in ``devices``."""
    env: dict[str, Any] = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_ext": _torch_ext_version(),
        "build_info": _build_info(),
        "cpu": _cpu_info(),
    }
    cuda_devices = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda_devices and torch.cuda.is_available():
        env["gpus"] = {str(d): _gpu_info(d) for d in cuda_devices}
    return env


def _torch_ext_version() -> str | None:
    try:
        return importlib.import_module("torch_ext._version").__version__
    except Exception:
        return None


def _build_info() -> Any:
    try:
        return importlib.import_module("torch_ext._C").build_info()
    except Exception as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def _cpu_info() -> dict[str, Any]:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # Other processes competing for the cores are the usual cause of noisy CPU numbers.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # Without /proc/cpuinfo flags cannot be known: report None rather than False.
        "isa": {flag: (flag in flags) if flags else None for flag in _ISA_FLAGS},
    }


def _gpu_info(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(cuda_index(device))
    info: dict[str, Any] = {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_total_bytes": props.total_memory,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        "pci_bus_id": pci_bus_id(device),
    }
    info.update(_nvml_info(device) or _nvidia_smi_info(device) or {"telemetry": "unavailable"})
    return info


def _nvml_info(device: torch.device) -> dict[str, Any] | None:
    lib, handle = nvml(), nvml_handle(device)
    if lib is None or handle is None:
        return None
    info: dict[str, Any] = {"telemetry": "nvml"}
    try:
        driver = lib.nvmlSystemGetDriverVersion()
        info["driver_version"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
    info.update(read_sample(lib, handle))
    return info


def _nvidia_smi_info(device: torch.device) -> dict[str, Any] | None:
    fields = ("driver_version", "clocks.sm", "clocks.mem", "power.draw")
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    bus_id = pci_bus_id(device)
    if bus_id is not None:
        cmd.append(f"--id={bus_id}")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except Exception:
        return None
    lines = result.stdout.strip().splitlines()
    values = [v.strip() for v in lines[0].split(",")] if lines else []
    if len(values) != len(fields):
        return None
    info: dict[str, Any] = {"telemetry": "nvidia-smi", "driver_version": values[0]}
    for key, raw in zip(("sm_clock_mhz", "mem_clock_mhz", "power_w"), values[1:]):
        try:
            info[key] = float(raw)
        except ValueError:  # "[N/A]" and the like
            continue
    return info
