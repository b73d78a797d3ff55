"""Decode steps replayed from CUDA graphs over KV caches of fixed, pruned sizes (`patch(..., cuda_graphs=True)`)."""
