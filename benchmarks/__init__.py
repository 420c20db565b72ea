"""Benchmarks for tied_lora_kernels (pytest-benchmark).

Run ``pytest benchmarks`` or ``python -m tied_lora_kernels bench``; see ``benchmarks/results/README.md``.
"""
