"""Benchmarks: throughput (bare diffusers vs genpipe), manifest scale, audit writes, and a GPU mode.

Run them with ``make bench`` / ``make bench-scale`` (see ``benchmarks/README.md``); results and the commands that
produced them are recorded in ``benchmarks/RESULTS.md``. Numbers are measurements, never test assertions.
"""
