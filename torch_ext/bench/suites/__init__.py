"""Built-in benchmark suites; importing this package registers all of them.

To add a suite, write ``suites/<family>.py`` with a function decorated by
``@register_suite("<family>")`` and import the module here.
"""

from . import activation, attention, conv, model, moe, quant, w8a8

__all__ = ["activation", "attention", "conv", "model", "moe", "quant", "w8a8"]
