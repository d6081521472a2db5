"""Benchmarks: ``python -m flashlab.bench cpu|gpu|memory``.

Timing lives here, never in tests. Each run writes a CSV under ``data/`` and a provenance file
beside it (machine, versions, date, the exact command).
"""
