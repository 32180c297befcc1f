"""Benchmark harness: ours vs baselines, with roofline, telemetry, JSON and plots.

Suites register themselves with :func:`register_suite`; :func:`run` measures
them and :func:`main` is the ``python -m torch_ext bench`` command line.
See ``benchmarks/README.md``.
"""

from .case import Case, isolated_registry, register_suite, registered_suites, unregister_suite
from .runner import main, run

__all__ = [
    "Case",
    "isolated_registry",
    "main",
    "register_suite",
    "registered_suites",
    "run",
    "unregister_suite",
]
