"""The engine: hooks that cut visual tokens inside an already-loaded model, and the per-call token state."""
