"""Evaluation: the GPU speed harness (and, later, the lmms-eval adapter, sweeps and reports)."""
