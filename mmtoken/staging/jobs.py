"""A request as the stages see it: its processed inputs, how many tokens it may get, and when each of its events
happened."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from mmtoken.encoding import Encoded

_IDS = itertools.count()


@dataclass
class Job:
    """One request: the processor's output for its prompt (one row), the most tokens to generate, an optional
    callback for each new token (called from the scheduler's thread), and its times (`time.perf_counter`): arrival,
    when its batch started, when its media were encoded, each new token, and the end. `future` gets the generated
    token ids, or the error that ended the request; `cache_hit` says whether its encoding came from the embedding
    cache (None: no cache asked), `encoder` which encoder processes encoded its parts (None: its own process)."""

    inputs: dict
    max_tokens: int
    on_token: Callable[[int], None] | None = None
    media_key: str | None = None
    cache_hit: bool | None = None
    encoder: tuple[int, ...] | None = None
    encoding: Encoded | Exception | None = None
    id: int = field(default_factory=lambda: next(_IDS))
    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None
    encoded: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finished: float | None = None
    future: Future = field(default_factory=Future)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"a request generates at least 1 token, got max_tokens={self.max_tokens}")

    def emit(self, token: int, at: float) -> None:
        self.tokens.append(token)
        self.token_times.append(at)
        if self.on_token is not None:
            self.on_token(token)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_tokens

    def times(self) -> dict[str, float | None]:
        """TTFT, TPOT, end-to-end and queueing time in seconds (None where the request got no token)."""
        if not self.token_times:
            return {"ttft_s": None, "tpot_s": None, "e2e_s": None, "queue_s": None}
        first, last = self.token_times[0], self.token_times[-1]
        tokens = len(self.token_times)
        return {
            "ttft_s": first - self.arrived,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else 0.0,
            "e2e_s": last - self.arrived,
            "queue_s": None if self.started is None else self.started - self.arrived,
        }
