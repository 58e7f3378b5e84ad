"""Serving throughput benchmark (paper section 6.3, Figures 1 and 4).

Run it with ``PYTHONPATH=src python -m benchmarks.serving.run --out DIR``; :mod:`.run` describes the set-up.
"""
