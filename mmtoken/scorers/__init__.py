"""Scorers: what to keep. Each turns the tokens entering a cut into one score per token; higher is kept."""

from mmtoken.scorers.attention import LastQueryAttention
from mmtoken.scorers.base import ScoreInput, Scorer
from mmtoken.scorers.grid import UniformGrid
from mmtoken.scorers.random import RandomScore

__all__ = ["LastQueryAttention", "RandomScore", "ScoreInput", "Scorer", "UniformGrid"]
