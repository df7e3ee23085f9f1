"""Measuring a model: FLOPs, latency and memory (``profile``) and the precision x batch-size table (``run_bench``)."""
