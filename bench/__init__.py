"""Benchmarks that print ratios measured side by side (never run as tests).

Run each as ``python -m bench.<name>`` from the repository root, so that the shared
test doubles in ``tests/fakes.py`` import.
"""
