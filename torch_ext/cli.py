"""The command line: `python -m torch_ext info | bench [...] | check`."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> int:
    """Print what was built, the devices present, and every op with its kernels."""
    import torch_ext

    build = torch_ext.build_info()
    print(f"torch_ext {build['version']} (built against torch {build['torch_version']}, {build['compiler']})")
    print(f"  running on torch {torch.__version__}, Python {platform.python_version()}")
    if build["cuda"]:
        print(f"  CUDA {build['cuda_version']}, GPU archs: {', '.join(build['cuda_archs'])}")
    else:
        print("  CUDA: not built (CPU-only build)")
    print(f"  CPU ISA paths compiled: {', '.join(build['cpu_isas_compiled'])}; "
          f"detected: {build['cpu_isa_detected']}; selected: {build['cpu_isa_selected']}")
    amx = [kind for kind in ("int8", "bf16") if build[f"cpu_amx_{kind}_detected"]]
    print(f"  AMX kernels: {'compiled' if build['cpu_amx_compiled'] else 'not built'}; "
          f"tiles detected: {', '.join(amx) if amx else 'none'}; mode: {build['cpu_amx_mode']} (TORCH_EXT_CPU_AMX)")
    print("devices:")
    print(f"  cpu: {_cpu_model()}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"  cuda:{index}: {props.name}, sm_{props.major}{props.minor}, "
                  f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("  cuda: none available")
    print("ops (torch.ops.torch_ext.*):")
    width = max(len(name) for name in build["ops"])
    for name in sorted(build["ops"]):
        kernels = build["ops"][name]
        present = [device for device in ("cpu", "cuda") if kernels[device]]
        print(f"  {name.ljust(width)}  {' '.join(present) if present else '(no kernels)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build info, devices, and every op with its kernels")
    sub.add_parser("bench", help="benchmarks against the named baselines (see `bench --help`)", add_help=False)
    sub.add_parser("check", help="self-test of each op family against its float64 reference; non-zero exit on "
                                 "failure")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and args.command != "bench":  # only bench takes further options (its own parser)
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(rest)}")
    if args.command == "info":
        return info()
    if args.command == "bench":
        from torch_ext import bench

        return bench.main(rest)
    if args.command == "check":
        from torch_ext import selfcheck

        return selfcheck.main()
    return 2
