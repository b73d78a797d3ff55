"""The load generator: traces of requests (when each arrives, what media it brings, how many tokens it asks for),
drawn from Poisson or gamma arrivals and a mix of prompt kinds, written to and read from JSON-lines files so a run
can be replayed exactly; and the media and prompts of a trace's rows for a model's processor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("image", "images", "video")  # one image, a multi-image prompt, a video
QUESTION = "describe what happens here and name every object you can see with its color and place"


@dataclass
class TraceRow:
    """One request of a trace: its arrival in seconds from the start, its kind (`KINDS`), how many images or
    frames, the seed of its media (equal seeds: equal media, which the embedding cache can reuse), its question
    and its token limit."""

    at: float
    kind: str
    count: int
    media: int
    max_tokens: int
    question: str = QUESTION


def arrivals(count: int, rate: float, process: str = "poisson", cv: float = 2.0, seed: int = 0) -> list[float]:
    """`count` arrival times at `rate` requests/s: a Poisson process, or gamma gaps with coefficient of variation
    `cv` (burstier than Poisson above 1)."""
    if rate <= 0 or count < 1:
        raise ValueError(f"arrivals need a rate > 0 and a count >= 1, got {rate} and {count}")
    generator = np.random.default_rng(seed)
    if process == "poisson":
        gaps = generator.exponential(1 / rate, count)
    elif process == "gamma":
        shape = 1 / cv**2
        gaps = generator.gamma(shape, 1 / (rate * shape), count)
    else:
        raise ValueError(f"arrival process is 'poisson' or 'gamma', got {process!r}")
    return np.cumsum(gaps).tolist()


def make_trace(
    count: int,
    rate: float,
    mix: dict[str, float],
    counts: dict[str, int],
    max_tokens: int = 32,
    repeat: float = 0.0,
    process: str = "poisson",
    seed: int = 0,
) -> list[TraceRow]:
    """A trace of `count` requests at `rate`: kinds drawn by the weights of `mix`, each with `counts[kind]` images
    or frames; with probability `repeat` a request brings the media of an earlier one of its kind."""
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"a mix weighs kinds among {KINDS} with weights >= 0, got {mix}")
    if not 0 <= repeat <= 1:
        raise ValueError(f"repeat is a probability, got {repeat}")
    generator = np.random.default_rng(seed + 1)
    kinds = list(mix)
    weights = np.array([mix[kind] for kind in kinds], dtype=float)
    rows, seen = [], {kind: [] for kind in kinds}
    for index, at in enumerate(arrivals(count, rate, process, seed=seed)):
        kind = kinds[generator.choice(len(kinds), p=weights / weights.sum())]
        if seen[kind] and generator.random() < repeat:
            media = int(generator.choice(seen[kind]))
        else:
            media = index
            seen[kind].append(media)
        rows.append(TraceRow(round(at, 6), kind, counts[kind] if kind != "image" else 1, media, max_tokens))
    return rows


def write_trace(rows: Sequence[TraceRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(row)) + "\n" for row in rows))


def read_trace(path: Path) -> list[TraceRow]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = TraceRow(**json.loads(line))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: not a trace row ({error})") from None
        if row.kind not in KINDS or row.count < 1 or row.max_tokens < 1 or row.at < 0:
            raise ValueError(f"{path}:{number}: a row needs a kind among {KINDS}, count and max_tokens >= 1, at >= 0")
        rows.append(row)
    return rows


def media_of(row: TraceRow, size: tuple[int, int]) -> list[Image.Image]:
    """The images or frames of `row`, drawn from its media seed: noise whose frames drift slowly, as video does."""
    generator = np.random.default_rng(row.media)
    base = generator.integers(0, 256, (size[1], size[0], 3)).astype(np.int16)
    frames = []
    for index in range(row.count):
        drift = generator.integers(-8, 9, base.shape) if index else 0
        base = np.clip(base + drift, 0, 255)
        frames.append(Image.fromarray(base.astype(np.uint8)))
    return frames


def prompt_inputs(processor: object, row: TraceRow, size: tuple[int, int]) -> dict:
    """The processor's inputs for `row`: its images (or video) then its question, as one user turn."""
    media = media_of(row, size)
    if row.kind == "video":
        content, arguments = [{"type": "video"}], {"videos": [media]}
    else:
        content, arguments = [{"type": "image"}] * len(media), {"images": [media]}
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": row.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], return_tensors="pt", **arguments))
