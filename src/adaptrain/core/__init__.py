"""The training loop: state, events, the step, precision, batches, metrics, losses, schedules, history.

Imports nothing from ``callbacks``, ``loggers``, ``profiling`` or ``cli`` (checked by import-linter).
"""
