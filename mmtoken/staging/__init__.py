"""Encode / prefill / decode as stages (DESIGN.md, concept 7): requests, an embedding cache keyed by the media's
content, an encoder beside or apart from the language model, a scheduler that batches requests, the load generator
and the OpenAI-compatible server."""
