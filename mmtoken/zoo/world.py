"""Probe world v2: CLEVR-like scenes whose objects span many patches, so that a probe model trained on them spreads
each answer over many tokens as real models do.

Version 1 (:mod:`mmtoken.zoo.probe`) draws flat objects one to five patches wide; a model trained on it keeps each
answer in a handful of tokens and loses four to eight times more than LLaVA-1.5-7B under pruning (issue 17). Here:

- objects are 3 to 7 patches wide (44 to 100 px of 336), lit by one light from the upper left, in three materials
  (matte; metal, with a highlight; striped), with soft shadows, on a floor of low-frequency texture with pebbles and
  a wall behind;
- they stand in a 3 x 3 layout of 112-px cells, jittered by up to 20 px, so large neighbours overlap: lower rows are
  nearer and hide part of the rows behind (an object stays more than half visible);
- the reading task shows a three-digit code, 36 to 46 px tall, on a sign in front of the scene;
- videos (224-px frames, 2 x 2 cells) change slowly: an object travels 24 to 40 px over the whole clip, whatever its
  length; the grain of the image sensor stays put, as in compressed video, so a still scene's frames are
  identical.

Every scene comes with a caption that lists its objects, for the vision tower's contrastive pretraining
(:mod:`mmtoken.zoo.pretrain`). Tasks fall in the groups of real benchmark suites (:data:`TASK_GROUPS`): perception,
attributes, relations, reading, and counting, which is reported apart as a stress task. Scenes are sampled as
tensors for a whole batch and rendered with torch ops on CPU or CUDA, as in version 1, whose drawing primitives
(signed-distance shapes and seven-segment digits) this module reuses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from mmtoken.zoo.probe import (
    _CIRCLE,
    _COLUMNS,
    _DIGITS,
    _DIRECTIONS,
    _PALETTE,
    _RELATIONS,
    _ROWS,
    _STAR,
    _YELLOW,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    VIDEO_SIZE,
    Batch,
    Sample,
    _avoiding,
    _cell_order,
    _coin,
    _digit_sdf,
    _flashes,
    _integers,
    _shape_sdf,
    _to_pil,
    _uniform,
)
from mmtoken.zoo.probe import _check as _check_counts

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "perception": ("exist", "shape"),
    "attributes": ("color", "material", "size"),
    "relations": ("locate", "relation"),
    "reading": ("read",),
    "counting": ("count",),
}
IMAGE_TASKS: tuple[str, ...] = tuple(task for group in TASK_GROUPS.values() for task in group)
VIDEO_TASKS: tuple[str, ...] = ("motion", "order", "events", "needle")
MATERIALS: tuple[str, ...] = ("matte", "metal", "striped")
SIZES: tuple[str, ...] = ("small", "large")

_CELL = 112
_GRID = {"image": 3, "video": 2}
_HALF_SIZES = {"image": ((22, 30), (40, 50)), "video": ((18, 23), (29, 36))}  # (small, large) half widths, px
_JITTER = {"image": 20, "video": 10}
_WINDOW = {"image": 104, "video": 76}  # wider than the largest object plus its soft edge
_SHADOW_WINDOW, _PEBBLE_WINDOW, _SIGN_WINDOW, _DIGIT_WINDOW = 112, 20, 160, 56
_PEBBLES = 8
_LIGHT = torch.tensor((-0.45, -0.55, 0.7))
_CHUNK = 180  # generate() renders this many samples at a time: a multiple of both task counts

_TEMPLATES = {
    "exist": "is there a {color} {shape}",
    "shape": "what shape is the {color} object",
    "color": "what color is the {size} {shape}",
    "material": "what material is the {color} {shape}",
    "size": "what size is the {color} {shape}",
    "locate": "where is the {color} {shape}",
    "relation": "where is the {color} {shape} relative to the {color2} {shape2}",
    "read": "what is the code on the sign",
    "count": "how many {color} objects are there",
    "motion": "which way does the {color} {shape} move",
    "order": "which appeared first the {color} {shape} or the {color2} {shape2}",
    "events": "how many times does the lamp flash",
    "needle": "what color was the star",
}
_COUNT_SHAPES = "how many {shape}s are there"
_CAPTION_WORDS = ("and", "sign")


def _vocabulary() -> tuple[str, ...]:
    words = re.sub(r"\{\w+\}s?", " ", " ".join((*_TEMPLATES.values(), _COUNT_SHAPES))).split()
    attributes = (*COLORS, *SHAPES, *(shape + "s" for shape in SHAPES), *MATERIALS, *SIZES)
    answers = (*_DIGITS, *_ROWS, *_COLUMNS, *_DIRECTIONS, *_RELATIONS.values(), "yes", "no")
    return tuple(sorted({*words, *attributes, *answers, *_CAPTION_WORDS}))


VOCABULARY: tuple[str, ...] = _vocabulary()


@dataclass
class Objects:
    """The objects of n scenes, one slot per cell of the layout (row-major, so a later row is nearer).

    ``centre`` is (n, frames, cells, 2) float pixels (x, y) and ``active`` (n, frames, cells) bool; the other
    fields are (n, cells): ``half`` (half width in px), ``color`` (into COLORS), ``shape`` (into SHAPES, or the star
    of the needle task), ``material`` (into MATERIALS), ``large`` (bool); ``dark`` (n, frames, cells) marks the
    lamp of the events task while it is off (drawn dark grey).
    """

    centre: Tensor
    half: Tensor
    color: Tensor
    shape: Tensor
    material: Tensor
    large: Tensor
    active: Tensor
    dark: Tensor


@dataclass
class Scenes(Batch):
    """A rendered batch of probe world v2: :class:`~mmtoken.zoo.probe.Batch` (``patch_labels`` is None) plus a
    caption per scene and the objects it shows (``codes``: the sign's three digits, (n, 3), -1 where none)."""

    captions: list[str] = field(default_factory=list)
    objects: Objects | None = None
    codes: Tensor | None = None


@dataclass
class _Part:
    """What one task samples for m scenes: objects per slot (slot 0 the target), their cells, questions, answers."""

    color: Tensor
    shape: Tensor
    material: Tensor
    large: Tensor
    active: Tensor  # (m, slots), or (m, frames, slots) for video tasks whose objects come and go
    cells: Tensor  # (m, slots): the cell of each slot
    questions: list[str]
    answers: list[str]
    code: Tensor | None = None  # (m, 3) digits of the sign, with `sign_cell` its left cell
    sign_cell: Tensor | None = None
    travel: Tensor | None = None  # (m, slots, 2) px each object moves over the clip
    lamp: Tensor | None = None  # (m, frames) bool: whether slot 0, the lamp, is lit


# ---------------------------------------------------------------------------------------------- task samplers


def _attributes(g: torch.Generator, m: int, slots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uniform colour, shape, material and size per slot."""
    return (_integers(g, 0, len(COLORS), m, slots), _integers(g, 0, len(SHAPES), m, slots),
            _integers(g, 0, len(MATERIALS), m, slots), _coin(g, m, slots))  # fmt: skip


def _unlike(g: torch.Generator, key: Tensor, keys: int, slots: int) -> Tensor:
    """(m, slots) keys in [0, keys) other than `key` (m,), uniform."""
    return (key[:, None] + _integers(g, 1, keys, key.shape[0], slots)) % keys


def _named(color: Tensor, shape: Tensor) -> list[str]:
    return [f"{COLORS[c]} {SHAPES[s]}" for c, s in zip(color.tolist(), shape.tolist(), strict=True)]


def _with_target(slot: Tensor, target: Tensor, others: Tensor) -> Tensor:
    """Slot 0 takes the target's value (m,), the other slots theirs (m, slots)."""
    return torch.where(slot == 0, target[:, None], others)


def _pair_key(g: torch.Generator, m: int, slots: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A (colour, shape) pair that only slot 0 has: colour and shape per slot, the pair (colour * 3 + shape, (m,)),
    material and size per slot."""
    color, shape, material, large = _attributes(g, m, slots)
    target = color[:, 0] * len(SHAPES) + shape[:, 0]
    pairs = _with_target(torch.arange(slots, device=g.device), target, _unlike(g, target, 21, slots))
    return pairs // len(SHAPES), pairs % len(SHAPES), target, material, large


def _up_to(g: torch.Generator, m: int, slots: int, low: int, high: int) -> Tensor:
    """(m, slots) bool: the first k slots, k uniform in [low, high]."""
    return torch.arange(slots, device=g.device) < _integers(g, low, high + 1, m)[:, None]


def _exist(g: torch.Generator, m: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 9)
    asked = color[:, 0] * 3 + shape[:, 0]
    # half the distractors share the colour or the shape of the asked pair
    same_color = color[:, :1] * 3 + (shape[:, :1] + _integers(g, 1, 3, m, 9)) % 3
    same_shape = ((color[:, :1] + _integers(g, 1, 7, m, 9)) % 7) * 3 + shape[:, :1]
    near = torch.where(_coin(g, m, 9), same_color, same_shape)
    pairs = torch.where(_coin(g, m, 9), near, _unlike(g, asked, 21, 9))
    present = _coin(g, m)
    pairs = torch.where((torch.arange(9, device=g.device) == 0) & present[:, None], asked[:, None], pairs)
    questions = [f"is there a {name}" for name in _named(asked // 3, asked % 3)]
    answers = ["yes" if p else "no" for p in present.tolist()]
    return _Part(pairs // 3, pairs % 3, material, large, _up_to(g, m, 9, 2, 6), _cell_order(g, m, 9), questions,
                 answers)  # fmt: skip


def _shape(g: torch.Generator, m: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 9)
    color = _with_target(torch.arange(9, device=g.device), color[:, 0], _unlike(g, color[:, 0], 7, 9))
    questions = [f"what shape is the {COLORS[c]} object" for c in color[:, 0].tolist()]
    return _Part(color, shape, material, large, _up_to(g, m, 9, 2, 6), _cell_order(g, m, 9), questions,
                 [SHAPES[s] for s in shape[:, 0].tolist()])  # fmt: skip


def _color(g: torch.Generator, m: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 9)
    asked = large[:, 0].long() * 3 + shape[:, 0]  # (size, shape) pairs, unique to slot 0
    keys = _with_target(torch.arange(9, device=g.device), asked, _unlike(g, asked, 6, 9))
    questions = [f"what color is the {SIZES[k // 3]} {SHAPES[k % 3]}" for k in asked.tolist()]
    return _Part(color, keys % 3, material, keys >= 3, _up_to(g, m, 9, 2, 6), _cell_order(g, m, 9), questions,
                 [COLORS[c] for c in color[:, 0].tolist()])  # fmt: skip


def _about_pair(task: str) -> Callable[[torch.Generator, int], _Part]:
    """The sampler of a task that asks for the material, the size or the place of a unique (colour, shape)."""

    def sample(g: torch.Generator, m: int) -> _Part:
        color, shape, asked, material, large = _pair_key(g, m, 9)
        cells = _cell_order(g, m, 9)
        if task == "material":
            answers = [MATERIALS[k] for k in material[:, 0].tolist()]
        elif task == "size":
            answers = [SIZES[k] for k in large[:, 0].long().tolist()]
        else:
            answers = [f"{_ROWS[cell // 3]} {_COLUMNS[cell % 3]}" for cell in cells[:, 0].tolist()]
        template = _TEMPLATES[task]
        questions = [template.format(color=COLORS[k // 3], shape=SHAPES[k % 3]) for k in asked.tolist()]
        return _Part(color, shape, material, large, _up_to(g, m, 9, 2, 6), cells, questions, answers)

    return sample


def _relation(g: torch.Generator, m: int) -> _Part:
    _, _, material, large = _attributes(g, m, 9)
    first = _integers(g, 0, 21, m)
    second = (first + _integers(g, 1, 21, m)) % 21
    slot = torch.arange(9, device=g.device)
    pairs = torch.where(slot == 0, first[:, None], torch.where(slot == 1, second[:, None],
                        _avoiding(g, first, second, 9)))  # fmt: skip
    horizontal, line, along = _coin(g, m), _integers(g, 0, 3, m), _integers(g, 0, 3, m)
    other = (along + _integers(g, 1, 3, m)) % 3
    pair = torch.stack((along, other), 1)
    both = torch.where(horizontal[:, None], line[:, None] * 3 + pair, pair * 3 + line[:, None])
    names = zip(_named(first // 3, first % 3), _named(second // 3, second % 3), strict=True)
    questions = [f"where is the {a} relative to the {b}" for a, b in names]
    before = (along < other).tolist()
    answers = [_RELATIONS[h, b] for h, b in zip(horizontal.tolist(), before, strict=True)]
    return _Part(pairs // 3, pairs % 3, material, large, _up_to(g, m, 9, 2, 5), _cell_order(g, m, 9, both),
                 questions, answers)  # fmt: skip


def _read(g: torch.Generator, m: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 9)
    left = _integers(g, 0, 3, m) * 3 + _integers(g, 0, 2, m)
    # slots 0 and 1 hold the sign's two cells and stay empty; one to four objects fill other cells
    cells = _cell_order(g, m, 9, torch.stack((left, left + 1), 1))
    active = _up_to(g, m, 9, 3, 6) & (torch.arange(9, device=g.device) >= 2)
    code = _integers(g, 0, 10, m, 3)
    answers = [" ".join(map(str, digits)) for digits in code.tolist()]
    return _Part(color, shape, material, large, active, cells, [_TEMPLATES["read"]] * m, answers, code=code,
                 sign_cell=left)  # fmt: skip


def _count(g: torch.Generator, m: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 9)
    targets, distractors = _integers(g, 1, 7, m), _integers(g, 0, 4, m)
    by_shape = _coin(g, m)[:, None]
    target = torch.arange(9, device=g.device) < targets[:, None]
    # counted by colour: the targets take slot 0's colour and the others another; by shape likewise
    color = torch.where(by_shape, color, torch.where(target, color[:, :1], _unlike(g, color[:, 0], 7, 9)))
    shape = torch.where(by_shape, torch.where(target, shape[:, :1], _unlike(g, shape[:, 0], 3, 9)), shape)
    questions = [_COUNT_SHAPES.format(shape=SHAPES[s]) if b else _TEMPLATES["count"].format(color=COLORS[c])
                 for c, s, b in zip(color[:, 0].tolist(), shape[:, 0].tolist(), by_shape[:, 0].tolist(),
                                    strict=True)]  # fmt: skip
    active = torch.arange(9, device=g.device) < (targets + distractors)[:, None]
    return _Part(color, shape, material, large, active, _cell_order(g, m, 9), questions,
                 [str(k) for k in targets.tolist()])  # fmt: skip


def _motion(g: torch.Generator, m: int, frames: int) -> _Part:
    color, shape, asked, material, large = _pair_key(g, m, 4)
    direction = _integers(g, 0, 4, m, 4)
    axis = F.one_hot(direction // 2, 2).float()
    sign = torch.where(direction % 2 == 1, 1.0, -1.0)[..., None]
    # the asked object moves; each other one moves or stands still
    moves = (torch.arange(4, device=g.device) == 0) | _coin(g, m, 4)
    travel = axis * sign * (_uniform(g, 24, 40, m, 4) * moves)[..., None]
    questions = [f"which way does the {name} move" for name in _named(asked // 3, asked % 3)]
    return _Part(color, shape, material, large, _up_to(g, m, 4, 2, 4), _cell_order(g, m, 4), questions,
                 [_DIRECTIONS[d] for d in direction[:, 0].tolist()], travel=travel)  # fmt: skip


def _order(g: torch.Generator, m: int, frames: int) -> _Part:
    _, _, material, large = _attributes(g, m, 4)
    first = _integers(g, 0, 21, m)
    second = ((first // 3 + _integers(g, 1, 7, m)) % 7) * 3 + _integers(g, 0, 3, m)  # another colour: the answer
    slot = torch.arange(4, device=g.device)
    pairs = torch.where(slot == 0, first[:, None], torch.where(slot == 1, second[:, None],
                        _avoiding(g, first, second, 4)))  # fmt: skip
    early = _integers(g, 0, frames - 1, m)
    late = _integers(g, early + 1, frames, m)
    first_early = _coin(g, m)
    appear = torch.zeros(m, 4, dtype=torch.long, device=g.device)
    appear[:, 0], appear[:, 1] = torch.where(first_early, early, late), torch.where(first_early, late, early)
    shown = torch.arange(frames, device=g.device)[None, :, None] >= appear[:, None]
    active = shown & _up_to(g, m, 4, 2, 4)[:, None]
    swap = _coin(g, m).tolist()
    names = list(zip(_named(first // 3, first % 3), _named(second // 3, second % 3), strict=True))
    questions = [f"which appeared first the {b} or the {a}" if s else f"which appeared first the {a} or the {b}"
                 for (a, b), s in zip(names, swap, strict=True)]  # fmt: skip
    earliest = torch.where(first_early, first // 3, second // 3)
    return _Part(pairs // 3, pairs % 3, material, large, active, _cell_order(g, m, 4), questions,
                 [COLORS[c] for c in earliest.tolist()])  # fmt: skip


def _events(g: torch.Generator, m: int, frames: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 4)
    count = _integers(g, 1, min(4, (frames + 1) // 2) + 1, m)
    slot = torch.arange(4, device=g.device)
    # slot 0 is the lamp, a small matte yellow ball; the others are squares and triangles
    shape = torch.where(slot == 0, _CIRCLE, _integers(g, 0, 2, m, 4) * 2)
    color, material, large = torch.where(slot == 0, _YELLOW, color), material * (slot > 0), large & (slot > 0)
    active = _up_to(g, m, 4, 2, 4)[:, None].expand(m, frames, 4)
    answers = [str(k) for k in count.tolist()]
    return _Part(color, shape, material, large, active, _cell_order(g, m, 4), [_TEMPLATES["events"]] * m, answers,
                 lamp=_flashes(g, count, frames))  # fmt: skip


def _needle(g: torch.Generator, m: int, frames: int) -> _Part:
    color, shape, material, large = _attributes(g, m, 4)
    moment = _integers(g, 0, frames, m)
    slot = torch.arange(4, device=g.device)
    shape = torch.where(slot == 0, _STAR, shape)
    shown = torch.arange(frames, device=g.device)[None, :, None] == moment[:, None, None]
    active = _up_to(g, m, 4, 2, 4)[:, None] & (shown | (slot > 0))
    return _Part(color, shape, material, large, active, _cell_order(g, m, 4), [_TEMPLATES["needle"]] * m,
                 [COLORS[c] for c in color[:, 0].tolist()])  # fmt: skip


_IMAGE_SAMPLERS: dict[str, Callable[[torch.Generator, int], _Part]] = {
    "exist": _exist, "shape": _shape, "color": _color, "material": _about_pair("material"),
    "size": _about_pair("size"), "locate": _about_pair("locate"), "relation": _relation, "read": _read,
    "count": _count,
}  # fmt: skip
_VIDEO_SAMPLERS: dict[str, Callable[[torch.Generator, int, int], _Part]] = {
    "motion": _motion, "order": _order, "events": _events, "needle": _needle,
}  # fmt: skip
# ---------------------------------------------------------------------------------------------- layout


def _layout(g: torch.Generator, part: _Part, kind: str, frames: int) -> Objects:
    """The objects of `part` in their cells: sizes, jittered centres kept on the canvas over the whole clip."""
    m, slots = part.color.shape
    size = IMAGE_SIZE if kind == "image" else VIDEO_SIZE
    grid, jitter = _GRID[kind], _JITTER[kind]
    (small_low, small_high), (large_low, large_high) = _HALF_SIZES[kind]
    half = torch.where(part.large, _uniform(g, large_low, large_high, m, slots),
                       _uniform(g, small_low, small_high, m, slots))  # fmt: skip
    cell = torch.stack((part.cells % grid, part.cells // grid), -1)
    centre = (cell + 0.5) * _CELL + _uniform(g, -jitter, jitter, m, slots, 2)
    travel = torch.zeros(m, slots, 2, device=g.device) if part.travel is None else part.travel
    low, high = (half + 2)[..., None], (size - half - 2)[..., None]
    start = torch.maximum(torch.minimum(centre, high - travel.clamp(min=0)), low - travel.clamp(max=0))
    progress = torch.linspace(0, 1, frames, device=g.device)[None, :, None, None]
    centres = start[:, None] + travel[:, None] * progress
    active = part.active if part.active.dim() == 3 else part.active[:, None].expand(m, frames, slots)
    dark = torch.zeros_like(active)
    if part.lamp is not None:
        dark[:, :, 0] = ~part.lamp
    # slot s stands in cell part.cells[:, s]; gather back so that index c is cell c (row-major: depth order)
    inverse = part.cells.argsort(1)

    def by_cell(x: Tensor, dim: int = 1) -> Tensor:
        index = inverse.view(m, *[1] * (dim - 1), slots, *[1] * (x.dim() - dim - 1))
        if dim > 1:
            index = index.expand(m, frames, slots, *x.shape[dim + 1 :])
        return x.gather(dim, index.expand(*x.shape[:dim], slots, *x.shape[dim + 1 :]))

    return Objects(by_cell(centres, 2), by_cell(half), by_cell(part.color), by_cell(part.shape),
                   by_cell(part.material), by_cell(part.large), by_cell(active, 2), by_cell(dark, 2))  # fmt: skip


# ---------------------------------------------------------------------------------------------- rendering


def _composite(canvas: Tensor, canvases: Tensor, centre: Tensor, window: int, draw: _Draw) -> None:
    """Replace the square window around each centre (P, 2) of the canvases (P,) in `canvas` (N, 3, S, S) float
    by `draw(dx, dy, region)`: dx (P, 1, B) and dy (P, B, 1) the pixel centres' offsets from the centre, region
    (P, 3, B, B) the pixels now. The windows of one call must lie on distinct canvases."""
    size = canvas.shape[-1]
    offsets = torch.arange(window, device=canvas.device)
    corner = (centre.round().long() - window // 2).clamp(0, size - window)
    xs, ys = corner[:, :1] + offsets, corner[:, 1:] + offsets  # (P, B)
    dx, dy = (xs + 0.5 - centre[:, :1])[:, None, :], (ys + 0.5 - centre[:, 1:])[:, :, None]
    index = (canvases[:, None, None, None], torch.arange(3, device=canvas.device)[None, :, None, None],
             ys[:, None, :, None], xs[:, None, None, :])  # fmt: skip
    canvas[index] = draw(dx, dy, canvas[index])


_Draw = Callable[[Tensor, Tensor, Tensor], Tensor]


def _coverage(sdf: Tensor, soft: float = 0.5) -> Tensor:
    """Alpha from signed distances (px): 1 inside, 0 outside, linear over `2 * soft` px at the edge."""
    return (0.5 - sdf / (2 * soft)).clamp(0, 1)


def _object_drawing(kind: Tensor, half: Tensor, rgb: Tensor, material: Tensor) -> _Draw:
    """Shaded objects: a sphere-like normal for balls and stars, flatter ones for squares and triangles, diffuse
    light from the upper left; metal adds a highlight, stripes darken every other band."""

    def draw(dx: Tensor, dy: Tensor, region: Tensor) -> Tensor:
        h = half[:, None, None]
        alpha = _coverage(_shape_sdf(kind, dx, dy, torch.stack((half, half), 1)))
        u, v = dx / h, dy / h
        curve = torch.where((kind == _CIRCLE) | (kind == _STAR), 1.0, 0.45)[:, None, None]
        nx, ny = u * curve, v * curve
        nz = (1 - nx.square() - ny.square()).clamp(min=0.05).sqrt()
        light = _LIGHT.to(dx.device) / _LIGHT.norm()
        diffuse = (nx * light[0] + ny * light[1] + nz * light[2]).clamp(0, 1)
        colour = rgb[:, :, None, None] * (0.3 + 0.8 * diffuse)[:, None]
        metal = (material == MATERIALS.index("metal"))[:, None, None]
        highlight = torch.exp(-((u + 0.35).square() + (v + 0.4).square()) / 0.03) * metal
        colour = torch.lerp(colour * torch.where(metal, 0.85, 1.0)[:, None], torch.full_like(colour, 255.0),
                            0.9 * highlight[:, None])  # fmt: skip
        stripe = ((u - v) * 2.5).frac().abs() < 0.5
        striped = (material == MATERIALS.index("striped"))[:, None, None]
        colour = colour * torch.where(stripe & striped, 0.55, 1.0)[:, None]
        return torch.lerp(region, colour.clamp(0, 255), alpha[:, None])

    return draw


def _shadow_drawing(half: Tensor) -> _Draw:
    """A soft dark ellipse on the floor."""

    def draw(dx: Tensor, dy: Tensor, region: Tensor) -> Tensor:
        ellipse = torch.stack((half, 0.3 * half), 1)
        alpha = _coverage(_shape_sdf(torch.full_like(half, _CIRCLE).long(), dx, dy, ellipse), soft=4.0)
        return region * (1 - 0.4 * alpha[:, None])

    return draw


def _flat_drawing(kind: Tensor, half: Tensor, rgb: Tensor, sdf: Callable) -> _Draw:
    """Flat-coloured shapes: pebbles, the sign's plate and its digits."""

    def draw(dx: Tensor, dy: Tensor, region: Tensor) -> Tensor:
        alpha = _coverage(sdf(kind, dx, dy, half))
        return torch.lerp(region, rgb[:, :, None, None].expand_as(region), alpha[:, None])

    return draw


def _backdrop(g: torch.Generator, n: int, size: int) -> Tensor:
    """(n, 3, size, size) float: a lit wall above a horizon, a floor darkening towards it, low-frequency texture
    over both, and pebbles on the floor."""
    device = g.device
    horizon = _uniform(g, 0.18, 0.3, n) * size
    wall = _uniform(g, 150, 200, n, 1) + _uniform(g, -15, 15, n, 3)
    floor = _uniform(g, 80, 140, n, 1) + _uniform(g, -15, 15, n, 3)
    y = torch.arange(size, device=device, dtype=torch.float32)[None, :]
    depth = ((y - horizon[:, None]) / (size - horizon[:, None])).clamp(0, 1)  # 0 at the horizon, 1 at the bottom
    floor_rgb = floor[:, :, None] * (0.75 + 0.35 * depth)[:, None]  # (n, 3, size)
    wall_rgb = wall[:, :, None] * (1 - 0.15 * y / horizon[:, None])[:, None]
    above = (y < horizon[:, None])[:, None]
    canvas = torch.where(above, wall_rgb, floor_rgb)[..., None].expand(n, 3, size, size)
    coarse = _uniform(g, -1, 1, n, 1, 6, 6)
    texture = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    canvas = canvas + texture * _uniform(g, 8, 20, n)[:, None, None, None]
    x = torch.rand(n, _PEBBLES, generator=g, device=device) * size
    y = horizon[:, None] + 6 + torch.rand(n, _PEBBLES, generator=g, device=device) * (size - horizon[:, None] - 6)
    half = _uniform(g, 3, 8, n, _PEBBLES, 2)
    grey = floor.mean(1)[:, None, None] + _uniform(g, -40, 40, n, _PEBBLES, 1)
    brown = torch.tensor((105.0, 70.0, 40.0), device=device) + _uniform(g, -15, 15, n, _PEBBLES, 1)
    rgb = torch.where(_coin(g, n, _PEBBLES)[..., None], brown, grey).clamp(0, 255)
    active = torch.arange(_PEBBLES, device=device) < _integers(g, 3, _PEBBLES + 1, n)[:, None]
    circle = torch.full((n,), _CIRCLE, device=device)
    for k in range(_PEBBLES):
        rows = active[:, k].nonzero().squeeze(1)
        _composite(canvas, rows, torch.stack((x, y), -1)[rows, k], _PEBBLE_WINDOW,
                   _flat_drawing(circle[rows], half[rows, k], rgb[rows, k], _shape_sdf))  # fmt: skip
    return canvas


def _paint_objects(canvas: Tensor, objects: Objects, g: torch.Generator, kind: str) -> None:
    """Shadows first, then the objects from the back row to the front one, on canvases (n * frames, 3, S, S)."""
    n, frames, cells = objects.active.shape
    rgb = (_PALETTE.to(g.device)[objects.color] + _uniform(g, -12, 12, n, cells, 3)).clamp(0, 255)
    rgb = torch.where(objects.dark[..., None], torch.tensor((60.0, 60.0, 60.0), device=g.device), rgb[:, None])
    canvas_of = torch.arange(n * frames, device=g.device).view(n, frames)
    for draw_shadows in (True, False):
        for cell in range(cells):
            sample, frame = objects.active[:, :, cell].nonzero(as_tuple=True)
            if not len(sample):
                continue
            half, centre = objects.half[sample, cell], objects.centre[sample, frame, cell]
            if draw_shadows:
                shadow = centre + torch.stack((0.25 * half, 0.85 * half), -1)
                _composite(canvas, canvas_of[sample, frame], shadow, _SHADOW_WINDOW, _shadow_drawing(half))
            else:
                draw = _object_drawing(objects.shape[sample, cell], half, rgb[sample, frame, cell],
                                       objects.material[sample, cell])  # fmt: skip
                _composite(canvas, canvas_of[sample, frame], centre, _WINDOW[kind], draw)


def _paint_signs(canvas: Tensor, g: torch.Generator, left: Tensor, code: Tensor, rows: Tensor) -> None:
    """Cream plates with three dark seven-segment digits, centred on the two cells from `left` (m,), on the
    canvases `rows` (m,)."""
    m = len(rows)
    height = _uniform(g, 36, 46, m)
    width, gap = 0.6 * height, 0.3 * height
    centre = torch.stack(((left % 3 + 1).float() * _CELL, (left // 3 + 0.5).float() * _CELL), -1)
    centre = centre + _uniform(g, -8, 8, m, 2)
    plate_half = torch.stack(((3 * width + 2 * gap) / 2 + 12, height / 2 + 10), -1)
    plate_rgb = _uniform(g, 215, 245, m, 1) + _uniform(g, -8, 8, m, 3)
    square = torch.zeros(m, dtype=torch.long, device=g.device)
    _composite(canvas, rows, centre, _SIGN_WINDOW, _flat_drawing(square, plate_half, plate_rgb, _shape_sdf))
    ink = _uniform(g, 15, 60, m, 1).expand(m, 3)
    for digit in range(3):
        x = centre[:, 0] + (digit - 1) * (width + gap)
        _composite(canvas, rows, torch.stack((x, centre[:, 1]), -1), _DIGIT_WINDOW,
                   _flat_drawing(code[:, digit], torch.stack((width, height), -1) / 2, ink, _digit_sdf))  # fmt: skip


def _caption(objects: Objects, code: Tensor, scene: int) -> str:
    """The image's objects in depth order, each as size, colour, material, shape and cell, then its sign."""
    words = []
    for cell in objects.active[scene, 0].nonzero().squeeze(1).tolist():
        place = f"{_ROWS[cell // 3]} {_COLUMNS[cell % 3]}"
        size, color = SIZES[int(objects.large[scene, cell])], COLORS[objects.color[scene, cell]]
        material, shape = MATERIALS[objects.material[scene, cell]], SHAPES[objects.shape[scene, cell]]
        words.append(f"{size} {color} {material} {shape} {place}")
    if code[scene, 0] >= 0:
        words.append("sign " + " ".join(map(str, code[scene].tolist())))
    return " and ".join(words)


# ---------------------------------------------------------------------------------------------- public API


def tasks(kind: str = "image") -> tuple[str, ...]:
    """The task names of `kind` ("image" or "video")."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    return IMAGE_TASKS if kind == "image" else VIDEO_TASKS


def _check(kind: str, n: int, task: str | None, frames: int) -> tuple[str, ...]:
    """The tasks to sample, round-robin; ValueError on an invalid kind, n, task or frame count."""
    valid = tasks(kind)
    _check_counts(kind, n, None, frames)  # version 1's checks of n and frames
    if task is not None and task not in valid:
        raise ValueError(f"unknown {kind} task {task!r}; valid: {', '.join(valid)}")
    return valid if task is None else (task,)


def _or_blank(values: Tensor | None, m: int, width: int | None, device: torch.device) -> Tensor:
    """`values`, or -1 for each of m scenes (of `width` values each) where a task has none."""
    return torch.full((m,) if width is None else (m, width), -1, device=device) if values is None else values


def render_batch(
    kind: str,
    n: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    task: str | None = None,
    frames: int = 8,
) -> Scenes:
    """Render n scenes of `task`, or of all `kind` tasks round-robin (scene i gets task i % len) when None.

    Scenes are drawn from `generator` and rendered on its device, then moved to `device`; `frames` (>= 2) applies
    to video. Images come with captions.
    """
    names = _check(kind, n, task, frames)
    frames = 1 if kind == "image" else frames
    size = IMAGE_SIZE if kind == "image" else VIDEO_SIZE
    parts, order, labels = [], [], []
    for position, name in enumerate(names):
        members = list(range(position, n, len(names)))
        if members:
            sampler = _IMAGE_SAMPLERS[name] if kind == "image" else _VIDEO_SAMPLERS[name]
            parts.append(
                sampler(generator, len(members)) if kind == "image" else sampler(generator, len(members), frames)
            )
            order += members
            labels += [name] * len(members)
    rows = torch.tensor(order, device=generator.device).argsort()  # the concatenated row of each scene
    questions = [q for p in parts for q in p.questions]
    answers = [a for p in parts for a in p.answers]
    layouts = [_layout(generator, p, kind, frames) for p in parts]
    objects = Objects(**{f.name: torch.cat([getattr(o, f.name) for o in layouts])[rows] for f in fields(Objects)})
    codes = torch.cat([_or_blank(p.code, len(p.answers), 3, generator.device) for p in parts])[rows]
    left = torch.cat([_or_blank(p.sign_cell, len(p.answers), None, generator.device) for p in parts])[rows]
    signed = (codes[:, 0] >= 0).nonzero().squeeze(1)
    canvas = _backdrop(generator, n, size).repeat_interleave(frames, 0)
    _paint_objects(canvas, objects, generator, kind)
    if len(signed):
        _paint_signs(canvas, generator, left[signed], codes[signed], signed)
    noise = torch.Generator(device=generator.device).manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    )
    grain = torch.randint(-4, 5, (n, 1, 3, size, size), generator=noise, device=generator.device, dtype=torch.int16)
    pixels = (canvas.view(n, frames, 3, size, size) + grain).round().clamp(0, 255).to(torch.uint8).to(device)
    pick = rows.tolist()
    questions, answers, labels = [questions[i] for i in pick], [answers[i] for i in pick], [labels[i] for i in pick]
    if kind == "video":
        return Scenes(pixels, questions, answers, labels, None, [], objects, codes)
    captions = [_caption(objects, codes, scene) for scene in range(n)]
    return Scenes(pixels[:, 0], questions, answers, labels, None, captions, objects, codes)


def generate(kind: str = "image", n: int = 16, seed: int = 0, task: str | None = None, frames: int = 8) -> list[Sample]:
    """n samples of `task`, or spread round-robin over all `kind` tasks when None, videos of `frames` frames;
    deterministic in `seed` (rendered on the CPU in chunks, so any seed is a fresh split of training's
    distribution)."""
    _check(kind, n, task, frames)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, n, _CHUNK):
        batch = render_batch(kind, min(_CHUNK, n - start), generator, "cpu", task, frames)
        for i, (question, answer, name) in enumerate(zip(batch.questions, batch.answers, batch.tasks, strict=True)):
            media = _to_pil(batch.pixels[i : i + 1] if kind == "image" else batch.pixels[i])
            samples.append(Sample(name, question, answer, media if kind == "image" else None,
                                  media if kind == "video" else None))  # fmt: skip
    return samples
