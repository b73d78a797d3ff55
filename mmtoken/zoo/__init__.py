"""The zoo: the probe data set, the embedded trained probe models, and tiny random-weight models for tests."""

from mmtoken.zoo.embedded import answers, ask, load

__all__ = ["answers", "ask", "load"]
