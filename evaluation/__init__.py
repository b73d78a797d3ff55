"""Evaluation: the lmms-eval model and probe tasks, sweeps, reports and plots, and the GPU speed harness."""
