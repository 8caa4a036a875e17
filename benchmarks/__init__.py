"""Checks of a machine, outside the installed package.

``python -m benchmarks.selftest``, from the root of a checkout: data-parallel training
against one process, the selection primitives and one step's time, on this machine's
devices.
"""
