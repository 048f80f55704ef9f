"""Benchmarks of seg-train: input pipeline, training, inference, CRF (see run_all.py)."""
