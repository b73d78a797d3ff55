"""A procedural probe set: visual questions whose answers need fine visual detail.

A small VLM trained on these questions fails when a token-pruning method drops the patches that hold the answer:
the objects are small (18 to 60 px on a 336 px image, i.e. one to five 14-px patches across), the background is
textured but redundant, and every question binds several attributes (colour and shape, position, digits, time).

Scenes are sampled as parameter tensors for a whole batch and rendered with pure torch ops (signed-distance
masks composited onto a uint8 canvas), on CPU or CUDA alike; :func:`render_batch` serves training,
:func:`generate` wraps it for people (CPU, PIL images). The layout is a grid of 112-px cells (3 x 3 on images,
2 x 2 on 224-px video frames) holding at most one object each, jittered inside its cell with an 8-px margin, so
objects never touch and a ``locate`` target lies well inside its answered cell.

Image tasks (336 x 336, LLaVA-1.5's 24 x 24 grid of 14-px patches): ``count``, ``color``, ``locate``,
``exist``, ``read`` (a three-digit seven-segment code), ``relation``. Video tasks (``frames`` frames of
224 x 224): ``motion``, ``order``, ``events`` (a lamp flashing), ``needle`` (a star in one frame).
Questions and answers are lowercase words of :data:`VOCABULARY` separated by single spaces.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from PIL import Image
from torch import Tensor

IMAGE_TASKS: tuple[str, ...] = ("count", "color", "locate", "exist", "read", "relation")
VIDEO_TASKS: tuple[str, ...] = ("motion", "order", "events", "needle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
IMAGE_SIZE, VIDEO_SIZE, PATCH = 336, 224, 14

_RGB = ((220, 30, 30), (30, 170, 60), (40, 90, 235), (245, 225, 40), (150, 50, 200), (255, 140, 0), (245, 245, 245))
_PALETTE = torch.tensor(_RGB, dtype=torch.float32)
_BROWN = torch.tensor((105.0, 70.0, 40.0))
_LAMP_OFF = torch.tensor((60.0, 60.0, 60.0))
_YELLOW = COLORS.index("yellow")
_SQUARE, _CIRCLE, _TRIANGLE, _STAR = range(4)
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "center", "right")
_DIRECTIONS = ("left", "right", "up", "down")  # index // 2 is the axis (x, y), index % 2 == 1 moves forward
_DIGITS = tuple(str(digit) for digit in range(10))
_CELL, _MARGIN = 112, 8
_IMAGE_GRID, _VIDEO_GRID, _IMAGE_SLOTS, _VIDEO_SLOTS = 3, 2, 9, 4
_OBJECT_WINDOW = {"image": 64, "video": 44}  # wider than the largest object (60 px, 40 px) plus its soft edge
_CLUTTER_SLOTS, _CLUTTER_WINDOW, _CODE_WINDOW = 6, 20, 32
_CHUNK = 120  # generate() renders this many samples at a time: a multiple of both task counts

_TEMPLATES = {
    "count": "how many {color} {shape}s are there",
    "color": "what color is the {shape}",
    "locate": "where is the {color} {shape}",
    "exist": "is there {article} {color} {shape}",
    "read": "what is the code",
    "relation": "where is the {color} {shape} relative to the {color2} {shape2}",
    "motion": "which way does the {color} {shape} move",
    "order": "which appeared first the {color} {shape} or the {color2} {shape2}",
    "events": "how many times does the lamp flash",
    "needle": "what color was the object in one frame",
}
_RELATIONS = {(True, True): "left", (True, False): "right", (False, True): "above", (False, False): "below"}

# Seven segments a..g of a digit box of width w, height h and stroke t: (centre x, centre y, half width,
# half height), each a combination of (w, h, t). Verticals run from a horizontal's outer edge to the middle.
_SEGMENT_GEOMETRY = torch.tensor(
    [
        [[0.5, 0, 0], [0, 0, 0.5], [0.5, 0, 0], [0, 0, 0.5]],  # a: top
        [[1, 0, -0.5], [0, 0.25, 0.25], [0, 0, 0.5], [0, 0.25, 0.25]],  # b: upper right
        [[1, 0, -0.5], [0, 0.75, -0.25], [0, 0, 0.5], [0, 0.25, 0.25]],  # c: lower right
        [[0.5, 0, 0], [0, 1, -0.5], [0.5, 0, 0], [0, 0, 0.5]],  # d: bottom
        [[0, 0, 0.5], [0, 0.75, -0.25], [0, 0, 0.5], [0, 0.25, 0.25]],  # e: lower left
        [[0, 0, 0.5], [0, 0.25, 0.25], [0, 0, 0.5], [0, 0.25, 0.25]],  # f: upper left
        [[0.5, 0, 0], [0, 0.5, 0], [0.5, 0, 0], [0, 0, 0.5]],  # g: middle
    ]
)
_SEGMENTS = torch.tensor(
    [[bit == "1" for bit in code] for code in
     ("1111110", "0110000", "1101101", "1111001", "0110011", "1011011", "1011111", "1110000", "1111111", "1111011")]
)  # fmt: skip


def _vocabulary() -> tuple[str, ...]:
    template_words = re.sub(r"\{\w+\}s?", " ", " ".join(_TEMPLATES.values())).split()
    plurals = (shape + "s" for shape in SHAPES)
    answers = (*_DIGITS, *_ROWS, *_COLUMNS, *_DIRECTIONS, *_RELATIONS.values(), "yes", "no", "a", "an")
    return tuple(sorted({*template_words, *COLORS, *SHAPES, *plurals, *answers}))


VOCABULARY: tuple[str, ...] = _vocabulary()


@dataclass
class Sample:
    """One probe question: ``images`` holds one PIL image for image tasks, ``video`` the frames for video tasks."""

    task: str
    question: str
    answer: str
    images: list[Image.Image] | None
    video: list[Image.Image] | None


@dataclass
class Batch:
    """A rendered batch.

    ``pixels`` is uint8 in [0, 255], (n, 3, H, W) for images or (n, T, 3, H, W) for video, on the requested
    device. ``patch_labels`` (images only, else None) is (n, H // 14, W // 14) long: for every 14-px patch,
    1 + the colour index (into :data:`COLORS`) of the object or code digit covering any of its pixels, 0 where
    the patch shows only background and clutter.
    """

    pixels: Tensor
    questions: list[str]
    answers: list[str]
    tasks: list[str]
    patch_labels: Tensor | None


@dataclass
class _Prims:
    """Primitives to paint, leading dims (samples, frames, slots) or, flattened, (canvases, slots)."""

    centre: Tensor  # (..., 2) float x, y in pixels
    half: Tensor  # (..., 2) float half width, half height
    kind: Tensor  # long: a shape index (square, circle/ellipse, triangle, star) or, for code glyphs, the digit
    rgb: Tensor  # (..., 3) float
    label: Tensor  # long: 1 + colour index, 0 for clutter
    active: Tensor  # bool

    def apply(self, fn: Callable[[Tensor], Tensor]) -> _Prims:
        """The same primitives with `fn` applied to every field."""
        return _Prims(**{field.name: fn(getattr(self, field.name)) for field in fields(self)})

    @staticmethod
    def cat(parts: list[_Prims]) -> _Prims:
        """Concatenate along the sample dim."""
        return _Prims(**{field.name: torch.cat([getattr(p, field.name) for p in parts]) for field in fields(_Prims)})


@dataclass
class _Part:
    """The scenes one task samples for m samples: objects (m, frames, slots), code glyphs (m, 1, 3) or None."""

    objects: _Prims
    code: _Prims | None
    questions: list[str]
    answers: list[str]


# ---------------------------------------------------------------------------------------------- random draws


def _uniform(g: torch.Generator, low: float | Tensor, high: float | Tensor, *size: int) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=g, device=g.device)


def _integers(g: torch.Generator, low: int | Tensor, high: int | Tensor, *size: int) -> Tensor:
    """Uniform integers in [low, high); the bounds may be tensors broadcasting to `size`."""
    unit = torch.rand(size, generator=g, device=g.device, dtype=torch.float64)
    return (low + unit * (high - low)).floor().long()


def _coin(g: torch.Generator, *size: int) -> Tensor:
    return torch.rand(size, generator=g, device=g.device) < 0.5


def _other(g: torch.Generator, color: Tensor, shape: Tensor, share: Tensor) -> tuple[Tensor, Tensor]:
    """Distractor (colour, shape) pairs unlike (color, shape): share 0 keeps the colour, 1 the shape, 2 neither."""
    size = share.shape
    other_shape = (shape + _integers(g, 1, 3, *size)) % 3
    other_color = (color + _integers(g, 1, 7, *size)) % 7
    pair = (color * 3 + shape + _integers(g, 1, 21, *size)) % 21
    colors = torch.where(share == 0, color, torch.where(share == 1, other_color, pair // 3))
    shapes = torch.where(share == 0, other_shape, torch.where(share == 1, shape, pair % 3))
    return colors, shapes


def _avoiding(g: torch.Generator, first: Tensor, second: Tensor, slots: int) -> Tensor:
    """(m, slots) uniform colour-shape pairs (colour * 3 + shape) unlike the distinct pairs first and second (m,)."""
    low, high = torch.minimum(first, second)[:, None], torch.maximum(first, second)[:, None]
    pair = _integers(g, 0, 19, first.shape[0], slots)
    pair = pair + (pair >= low)
    return pair + (pair >= high)


def _cell_order(g: torch.Generator, m: int, cells: int, first: Tensor | None = None) -> Tensor:
    """(m, cells): a random order of the grid's cells per sample, starting with the cells in `first` (m, k)."""
    scores = torch.rand(m, cells, generator=g, device=g.device)
    if first is not None:
        head = torch.arange(-first.shape[1], 0, device=g.device, dtype=scores.dtype)
        scores.scatter_(1, first, head.expand(m, -1))
    return scores.argsort(1)


def _corner(cells: Tensor, grid: int) -> Tensor:
    """(..., 2) the top-left pixel of each cell's usable area (x, y)."""
    return torch.stack((cells % grid, cells // grid), -1) * _CELL + _MARGIN


def _place(g: torch.Generator, cells: Tensor, size: Tensor, grid: int) -> Tensor:
    """(m, slots, 2) centres of objects of `size` px at uniform places inside their cells."""
    room = (_CELL - 2 * _MARGIN - size)[..., None]
    return _corner(cells, grid) + size[..., None] / 2 + torch.rand(*size.shape, 2, generator=g, device=g.device) * room


def _solids(centre: Tensor, size: Tensor, kind: Tensor, color: Tensor, active: Tensor) -> _Prims:
    """Palette-coloured objects: centre (m, T, S, 2) and active (m, T, S); size, kind and color (m, S)."""
    m, frames, slots = active.shape

    def framed(x: Tensor) -> Tensor:
        return x[:, None].expand(m, frames, *x.shape[1:]).contiguous()

    half = (size / 2)[..., None].expand(m, slots, 2)
    rgb = _PALETTE.to(color.device)[color]
    return _Prims(centre.contiguous(), framed(half), framed(kind), framed(rgb), framed(color + 1), active.contiguous())


# ---------------------------------------------------------------------------------------------- image tasks


def _image_objects(g: torch.Generator, cells: Tensor, colors: Tensor, shapes: Tensor, active: Tensor) -> _Prims:
    size = _uniform(g, 18, 60, *colors.shape)
    return _solids(_place(g, cells, size, _IMAGE_GRID)[:, None], size, shapes, colors, active[:, None])


def _slots(device: torch.device, slots: int = _IMAGE_SLOTS) -> Tensor:
    return torch.arange(slots, device=device)


def _names(colors: Tensor, shapes: Tensor) -> list[str]:
    return [f"{COLORS[c]} {SHAPES[s]}" for c, s in zip(colors.tolist(), shapes.tolist(), strict=True)]


def _count(g: torch.Generator, m: int) -> _Part:
    color, shape = _integers(g, 0, 7, m), _integers(g, 0, 3, m)
    targets, distractors = _integers(g, 1, 7, m), _integers(g, 1, 4, m)
    slot = _slots(g.device)
    other_color, other_shape = _other(g, color[:, None], shape[:, None], _integers(g, 0, 3, m, _IMAGE_SLOTS))
    target = slot < targets[:, None]
    colors, shapes = torch.where(target, color[:, None], other_color), torch.where(target, shape[:, None], other_shape)
    objects = _image_objects(g, _cell_order(g, m, 9), colors, shapes, slot < (targets + distractors)[:, None])
    questions = [f"how many {name}s are there" for name in _names(color, shape)]
    return _Part(objects, None, questions, [str(k) for k in targets.tolist()])


def _color(g: torch.Generator, m: int) -> _Part:
    color, shape, distractors = _integers(g, 0, 7, m), _integers(g, 0, 3, m), _integers(g, 1, 5, m)
    first = _slots(g.device) == 0
    shapes = torch.where(first, shape[:, None], (shape[:, None] + _integers(g, 1, 3, m, _IMAGE_SLOTS)) % 3)
    colors = torch.where(first, color[:, None], _integers(g, 0, 7, m, _IMAGE_SLOTS))
    objects = _image_objects(g, _cell_order(g, m, 9), colors, shapes, _slots(g.device) <= distractors[:, None])
    questions = [f"what color is the {SHAPES[s]}" for s in shape.tolist()]
    return _Part(objects, None, questions, [COLORS[c] for c in color.tolist()])


def _locate(g: torch.Generator, m: int) -> _Part:
    color, shape, distractors = _integers(g, 0, 7, m), _integers(g, 0, 3, m), _integers(g, 1, 5, m)
    other_color, other_shape = _other(g, color[:, None], shape[:, None], _integers(g, 0, 3, m, _IMAGE_SLOTS))
    first = _slots(g.device) == 0
    colors, shapes = torch.where(first, color[:, None], other_color), torch.where(first, shape[:, None], other_shape)
    cells = _cell_order(g, m, 9)
    objects = _image_objects(g, cells, colors, shapes, _slots(g.device) <= distractors[:, None])
    answers = [f"{_ROWS[cell // 3]} {_COLUMNS[cell % 3]}" for cell in cells[:, 0].tolist()]
    return _Part(objects, None, [f"where is the {name}" for name in _names(color, shape)], answers)


def _exist(g: torch.Generator, m: int) -> _Part:
    color, shape, present, total = _integers(g, 0, 7, m), _integers(g, 0, 3, m), _coin(g, m), _integers(g, 2, 6, m)
    other_color, other_shape = _other(g, color[:, None], shape[:, None], _integers(g, 0, 2, m, _IMAGE_SLOTS))
    target = (_slots(g.device) == 0) & present[:, None]
    colors, shapes = torch.where(target, color[:, None], other_color), torch.where(target, shape[:, None], other_shape)
    objects = _image_objects(g, _cell_order(g, m, 9), colors, shapes, _slots(g.device) < total[:, None])
    questions = [f"is there {'an' if name[0] in 'aeiou' else 'a'} {name}" for name in _names(color, shape)]
    return _Part(objects, None, questions, ["yes" if p else "no" for p in present.tolist()])


def _code(g: torch.Generator, digits: Tensor, color: Tensor, cell: Tensor) -> _Prims:
    """(m, 1, 3) seven-segment glyphs of the digits (m, 3), 20 to 28 px tall, at a random place in `cell`."""
    m = digits.shape[0]
    height = _uniform(g, 20, 28, m)
    width, gap = 0.6 * height, 0.35 * height
    room = torch.stack((_CELL - 2 * _MARGIN - 3 * width - 2 * gap, _CELL - 2 * _MARGIN - height), -1)
    corner = _corner(cell, _IMAGE_GRID) + torch.rand(m, 2, generator=g, device=g.device) * room
    step = torch.arange(3, device=g.device) * (width + gap)[:, None]
    left = corner[:, :1] + width[:, None] / 2 + step
    centre = torch.stack((left, (corner[:, 1:] + height[:, None] / 2).expand(m, 3)), -1)
    half = torch.stack((width, height), -1)[:, None].expand(m, 3, 2) / 2
    rgb = _PALETTE.to(g.device)[color][:, None].expand(m, 3, 3)
    label = (color + 1)[:, None].expand(m, 3)
    active = torch.ones(m, 3, dtype=torch.bool, device=g.device)
    return _Prims(centre, half, digits, rgb, label, active).apply(lambda x: x[:, None].contiguous())


def _no_code(m: int, device: torch.device) -> _Prims:
    zeros = torch.zeros(m, 1, 3, device=device)
    return _Prims(zeros[..., None].expand(m, 1, 3, 2), zeros[..., None].expand(m, 1, 3, 2), zeros.long(),
                  zeros[..., None].expand(m, 1, 3, 3), zeros.long(), zeros.bool())  # fmt: skip


def _read(g: torch.Generator, m: int) -> _Part:
    digits, color, distractors = _integers(g, 0, 10, m, 3), _integers(g, 0, 7, m), _integers(g, 1, 4, m)
    cells = _cell_order(g, m, 9)
    colors, shapes = _integers(g, 0, 7, m, _IMAGE_SLOTS), _integers(g, 0, 3, m, _IMAGE_SLOTS)
    slot = _slots(g.device)
    objects = _image_objects(g, cells, colors, shapes, (slot >= 1) & (slot <= distractors[:, None]))
    answers = [" ".join(map(str, code)) for code in digits.tolist()]
    return _Part(objects, _code(g, digits, color, cells[:, 0]), ["what is the code"] * m, answers)


def _align(g: torch.Generator, objects: _Prims, horizontal: Tensor) -> None:
    """Put the centroids of the first two objects on one line across their relation, at most 6 px apart.

    Both stay inside their cells' usable areas; a triangle's centroid lies a third of its half height below its
    box centre, which matters for a horizontal pair.
    """
    m = horizontal.shape[0]
    centre = objects.centre[:, 0]  # (m, slots, 2), a view
    axis = horizontal.long()  # the minor axis: y for a horizontal pair, x for a vertical one
    half = objects.half[:, 0, :2, 0]
    shift = torch.where((objects.kind[:, 0, :2] == _TRIANGLE) & horizontal[:, None], half / 3, 0.0)
    start = (centre[:, 0].gather(1, axis[:, None]) // _CELL) * _CELL  # (m, 1)
    low = (start + _MARGIN + half + shift).amax(1) + 3
    high = (start + _CELL - _MARGIN - half + shift).amin(1) - 3
    line = low + torch.rand(m, generator=g, device=g.device) * (high - low)
    minor = line[:, None] + _uniform(g, -3, 3, m, 2) - shift
    centre[:, :2].scatter_(2, axis[:, None, None].expand(m, 2, 1), minor[..., None])


def _relation(g: torch.Generator, m: int) -> _Part:
    first = _integers(g, 0, 21, m)
    second = (first + _integers(g, 1, 21, m)) % 21
    horizontal, line, along = _coin(g, m), _integers(g, 0, 3, m), _integers(g, 0, 3, m)
    other = (along + _integers(g, 1, 3, m)) % 3
    pair = torch.stack((along, other), 1)
    cells = torch.where(horizontal[:, None], line[:, None] * 3 + pair, pair * 3 + line[:, None])
    slot = _slots(g.device)
    pairs = torch.where(
        slot == 0, first[:, None], torch.where(slot == 1, second[:, None], _avoiding(g, first, second, 9))
    )
    active = slot < 2 + _integers(g, 0, 4, m)[:, None]
    objects = _image_objects(g, _cell_order(g, m, 9, cells), pairs // 3, pairs % 3, active)
    _align(g, objects, horizontal)
    names = zip(_names(first // 3, first % 3), _names(second // 3, second % 3), strict=True)
    questions = [f"where is the {a} relative to the {b}" for a, b in names]
    before = (along < other).tolist()
    answers = [_RELATIONS[h, b] for h, b in zip(horizontal.tolist(), before, strict=True)]
    return _Part(objects, None, questions, answers)


# ---------------------------------------------------------------------------------------------- video tasks


def _static(g: torch.Generator, cells: Tensor, size: Tensor, frames: int) -> Tensor:
    """(m, frames, slots, 2) centres that stay put."""
    centre = _place(g, cells, size, _VIDEO_GRID)
    return centre[:, None].expand(-1, frames, -1, -1)


def _moving(g: torch.Generator, cells: Tensor, size: Tensor, direction: Tensor, frames: int) -> Tensor:
    """(m, frames, slots, 2) centres moving steadily in `direction` over 70 to 100 % of their cell's room."""
    m, slots = size.shape
    start = _place(g, cells, size, _VIDEO_GRID)
    axis = direction // 2
    low = _corner(cells, _VIDEO_GRID).gather(2, axis[..., None]).squeeze(2) + size / 2
    room = _CELL - 2 * _MARGIN - size
    travel = room * _uniform(g, 0.7, 1.0, m, slots)
    near = low + torch.rand(m, slots, generator=g, device=g.device) * (room - travel)
    forward = direction % 2 == 1
    begin, end = torch.where(forward, near, near + travel), torch.where(forward, near + travel, near)
    progress = torch.linspace(0, 1, frames, device=g.device)[None, :, None]
    along = begin[:, None] + (end - begin)[:, None] * progress
    centre = start[:, None].expand(m, frames, slots, 2).clone()
    centre.scatter_(3, axis[:, None, :, None].expand(m, frames, slots, 1), along[..., None])
    return centre


def _always(active: Tensor, frames: int) -> Tensor:
    return active[:, None].expand(-1, frames, -1)


def _motion(g: torch.Generator, m: int, frames: int) -> _Part:
    target, distractors = _integers(g, 0, 21, m), _integers(g, 1, 4, m)
    slot = _slots(g.device, _VIDEO_SLOTS)
    pairs = torch.where(slot == 0, target[:, None], (target[:, None] + _integers(g, 1, 21, m, _VIDEO_SLOTS)) % 21)
    size, direction = _uniform(g, 20, 36, m, _VIDEO_SLOTS), _integers(g, 0, 4, m, _VIDEO_SLOTS)
    centre = _moving(g, _cell_order(g, m, _VIDEO_SLOTS), size, direction, frames)
    objects = _solids(centre, size, pairs % 3, pairs // 3, _always(slot <= distractors[:, None], frames))
    questions = [f"which way does the {name} move" for name in _names(target // 3, target % 3)]
    return _Part(objects, None, questions, [_DIRECTIONS[d] for d in direction[:, 0].tolist()])


def _order(g: torch.Generator, m: int, frames: int) -> _Part:
    first = _integers(g, 0, 21, m)
    second = ((first // 3 + _integers(g, 1, 7, m)) % 7) * 3 + _integers(g, 0, 3, m)  # another colour
    slot = _slots(g.device, _VIDEO_SLOTS)
    pairs = torch.where(
        slot == 0, first[:, None], torch.where(slot == 1, second[:, None], _avoiding(g, first, second, 4))
    )
    early = _integers(g, 0, frames - 1, m)
    late = _integers(g, early + 1, frames, m)
    first_early = _coin(g, m)
    appear = torch.zeros(m, _VIDEO_SLOTS, dtype=torch.long, device=g.device)
    appear[:, 0], appear[:, 1] = torch.where(first_early, early, late), torch.where(first_early, late, early)
    shown = torch.arange(frames, device=g.device)[None, :, None] >= appear[:, None]
    active = shown & _always(slot < 2 + _integers(g, 0, 3, m)[:, None], frames)
    size = _uniform(g, 20, 36, m, _VIDEO_SLOTS)
    cells = _cell_order(g, m, _VIDEO_SLOTS)
    objects = _solids(_static(g, cells, size, frames), size, pairs % 3, pairs // 3, active)
    swap = _coin(g, m).tolist()
    names = list(zip(_names(first // 3, first % 3), _names(second // 3, second % 3), strict=True))
    questions = [f"which appeared first the {b} or the {a}" if s else f"which appeared first the {a} or the {b}"
                 for (a, b), s in zip(names, swap, strict=True)]  # fmt: skip
    earliest = torch.where(first_early, first // 3, second // 3)
    return _Part(objects, None, questions, [COLORS[c] for c in earliest.tolist()])


def _flashes(g: torch.Generator, count: Tensor, frames: int) -> Tensor:
    """(m, frames) bool: `count` (m,) distinct, pairwise non-consecutive frames, uniform over such sets."""
    m = count.shape[0]
    position = torch.arange(frames, device=g.device)
    scores = torch.rand(m, frames, generator=g, device=g.device)
    scores = scores.masked_fill(position > frames - count[:, None], 2.0)  # k of frames - k + 1 compressed places
    chosen = scores.argsort(1).argsort(1) < count[:, None]
    frame = torch.where(chosen, position + chosen.cumsum(1) - 1, frames)  # spread the k places one frame apart
    on = torch.zeros(m, frames + 1, dtype=torch.bool, device=g.device)
    return on.scatter_(1, frame, True)[:, :frames]


def _events(g: torch.Generator, m: int, frames: int) -> _Part:
    count = _integers(g, 1, min(4, (frames + 1) // 2) + 1, m)
    on = _flashes(g, count, frames)
    slot = _slots(g.device, _VIDEO_SLOTS)
    shapes = torch.where(slot == 0, _CIRCLE, _integers(g, 0, 2, m, _VIDEO_SLOTS) * 2)  # squares, triangles
    colors = torch.where(slot == 0, _YELLOW, _integers(g, 0, 7, m, _VIDEO_SLOTS))
    size = torch.where(slot == 0, _uniform(g, 14, 24, m, _VIDEO_SLOTS), _uniform(g, 20, 36, m, _VIDEO_SLOTS))
    active = _always(slot <= _integers(g, 1, 3, m)[:, None], frames)
    objects = _solids(_static(g, _cell_order(g, m, _VIDEO_SLOTS), size, frames), size, shapes, colors, active)
    off = _LAMP_OFF.to(g.device)
    objects.rgb[:, :, 0] = torch.where(on[..., None], objects.rgb[:, :, 0], off)
    return _Part(objects, None, ["how many times does the lamp flash"] * m, [str(k) for k in count.tolist()])


def _needle(g: torch.Generator, m: int, frames: int) -> _Part:
    color, moment = _integers(g, 0, 7, m), _integers(g, 0, frames, m)
    slot = _slots(g.device, _VIDEO_SLOTS)
    shapes = torch.where(slot == 0, _STAR, _integers(g, 0, 3, m, _VIDEO_SLOTS))
    colors = torch.where(slot == 0, color[:, None], _integers(g, 0, 7, m, _VIDEO_SLOTS))
    size = torch.where(slot == 0, _uniform(g, 26, 40, m, _VIDEO_SLOTS), _uniform(g, 20, 36, m, _VIDEO_SLOTS))
    shown = torch.arange(frames, device=g.device)[None, :, None] == moment[:, None, None]
    active = _always(slot <= _integers(g, 1, 4, m)[:, None], frames) & (shown | (slot > 0))
    objects = _solids(_static(g, _cell_order(g, m, _VIDEO_SLOTS), size, frames), size, shapes, colors, active)
    return _Part(objects, None, ["what color was the object in one frame"] * m, [COLORS[c] for c in color.tolist()])


_IMAGE_SAMPLERS: dict[str, Callable[[torch.Generator, int], _Part]] = {
    "count": _count, "color": _color, "locate": _locate, "exist": _exist, "read": _read, "relation": _relation,
}  # fmt: skip
_VIDEO_SAMPLERS: dict[str, Callable[[torch.Generator, int, int], _Part]] = {
    "motion": _motion, "order": _order, "events": _events, "needle": _needle,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- rendering


def _rect(dx: Tensor, dy: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    return torch.maximum(dx.abs() - hx, dy.abs() - hy)


def _ellipse(dx: Tensor, dy: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    return ((dx / hx).square() + (dy / hy).square()).sqrt().sub(1) * torch.minimum(hx, hy)


def _triangle(dx: Tensor, dy: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    """Isosceles, apex up, filling the box of half sizes (hx, hy)."""
    side = (dx.abs() * (2 * hy) - (dy + hy) * hx) / (4 * hy.square() + hx.square()).sqrt()
    return torch.maximum(side, dy - hy)


def _star(dx: Tensor, dy: Tensor, hx: Tensor, hy: Tensor) -> Tensor:
    """A six-pointed star: two equilateral triangles of circumradius hy about the centre (hx is unused)."""
    width, height, shift = hy * 3**0.5 / 2, hy * 0.75, hy / 4
    return torch.minimum(_triangle(dx, dy + shift, width, height), _triangle(dx, shift - dy, width, height))


_SHAPE_SDFS = (_rect, _ellipse, _triangle, _star)  # indexed by _SQUARE, _CIRCLE, _TRIANGLE, _STAR


def _shape_sdf(kind: Tensor, dx: Tensor, dy: Tensor, half: Tensor) -> Tensor:
    """(P, B, B) signed distances (px, negative inside) of P shapes over their windows' pixel offsets."""
    hx, hy = half[:, 0, None, None], half[:, 1, None, None]
    out = dx.new_empty(kind.shape[0], dy.shape[1], dx.shape[2])
    for shape, sdf in enumerate(_SHAPE_SDFS):
        rows = (kind == shape).nonzero().squeeze(1)
        out[rows] = sdf(dx[rows], dy[rows], hx[rows], hy[rows])
    return out


def _digit_sdf(kind: Tensor, dx: Tensor, dy: Tensor, half: Tensor) -> Tensor:
    """(P, B, B) signed distances of seven-segment glyphs of the digits `kind` filling boxes of half sizes `half`."""
    width, height = 2 * half[:, 0], 2 * half[:, 1]
    size = torch.stack((width, height, (height / 7).clamp(min=3)), 1)
    segments = torch.einsum("sck,pk->psc", _SEGMENT_GEOMETRY.to(dx.device), size)  # (P, 7, 4)
    centre = (segments[..., :2] - half[:, None])[..., None, None]
    extent = segments[..., 2:, None, None]
    distance = torch.maximum(
        (dx[:, None] - centre[:, :, 0]).abs() - extent[:, :, 0], (dy[:, None] - centre[:, :, 1]).abs() - extent[:, :, 1]
    )
    lit = _SEGMENTS.to(dx.device)[kind]
    return distance.masked_fill(~lit[..., None, None], torch.inf).amin(1)


_Sdf = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _paint(canvas: Tensor, prims: _Prims, window: int, sdf: _Sdf, labels: Tensor | None = None) -> None:
    """Composite the active primitives (N, K) onto the square canvases (N, 3, S, S) in place, with soft edges.

    One call writes each pixel at most once, so its primitives must not overlap (nor their 1-px soft edges);
    `labels` (N, (S // 14) ** 2), where given, takes the max with each primitive's label over the patches it
    covers.
    """
    sample, slot = prims.active.nonzero(as_tuple=True)
    centre = prims.centre[sample, slot]
    size = canvas.shape[-1]
    offsets = torch.arange(window, device=canvas.device)
    corner = (centre.round().long() - window // 2).clamp(0, size - window)
    xs, ys = corner[:, :1] + offsets, corner[:, 1:] + offsets  # (P, B)
    dx, dy = (xs + 0.5 - centre[:, :1])[:, None, :], (ys + 0.5 - centre[:, 1:])[:, :, None]
    alpha = (0.5 - sdf(prims.kind[sample, slot], dx, dy, prims.half[sample, slot])).clamp_(0, 1)
    which, row, column = alpha.nonzero(as_tuple=True)  # the covered pixels
    weight = alpha[which, row, column][:, None]
    plane = size * size
    starts = sample[:, None] * (3 * plane) + ys * size  # (P, B): offset of each window row in the red plane
    index = (starts[which, row] + xs[which, column])[:, None] + torch.arange(0, 3 * plane, plane, device=xs.device)
    flat = canvas.view(-1)
    flat[index] = torch.lerp(flat[index].float(), prims.rgb[sample, slot][which], weight).round_().to(torch.uint8)
    if labels is not None:
        side = size // PATCH
        patch_rows = sample[:, None] * labels.shape[1] + (ys // PATCH) * side
        patch = patch_rows[which, row] + (xs // PATCH)[which, column]
        label = torch.where(weight[:, 0] >= 0.5, prims.label[sample, slot][which], 0)
        labels.view(-1).scatter_reduce_(0, patch, label, "amax")


@dataclass
class _Backdrop:
    """Per-sample background: base colour (n, 3), signed shading amplitudes along x and y (n, 2), clutter."""

    base: Tensor
    shade: Tensor
    clutter: _Prims

    def to(self, device: str | torch.device) -> _Backdrop:
        """The same backdrop on `device`."""
        return _Backdrop(self.base.to(device), self.shade.to(device), self.clutter.apply(lambda x: x.to(device)))


def _backdrop(g: torch.Generator, n: int, size: int) -> _Backdrop:
    """Mid-tone tinted backgrounds with 2 to 6 small grey or brown blobs of clutter."""
    base = _uniform(g, 55, 115, n, 1) + _uniform(g, -12, 12, n, 3)
    shade = _uniform(g, -20, 20, n, 2)
    k = _CLUTTER_SLOTS
    centre = torch.rand(n, k, 2, generator=g, device=g.device) * size
    half = _uniform(g, 3, 8, n, k, 2)
    sign = torch.where(_coin(g, n, k), 1.0, -1.0)
    grey = (base[:, None] + (sign * _uniform(g, 25, 45, n, k))[..., None]).clamp(0, 255)
    brown = _BROWN.to(g.device) + _uniform(g, -15, 15, n, k, 1)
    rgb = torch.where(_coin(g, n, k)[..., None], brown, grey)
    active = torch.arange(k, device=g.device) < _integers(g, 2, k + 1, n)[:, None]
    kind = torch.full((n, k), _CIRCLE, device=g.device)
    clutter = _Prims(centre, half, kind, rgb, torch.zeros_like(kind), active).apply(lambda x: x[:, None])
    return _Backdrop(base, shade, clutter)


def _background(backdrop: _Backdrop, size: int, noise: torch.Generator) -> Tensor:
    """(n, 3, size, size) uint8: base colour + linear shading (0 to 20 levels) + uniform grain (0 to 15 levels)."""
    n, device = backdrop.base.shape[0], backdrop.base.device
    bits = torch.empty(n * size * size // 8 + 1, dtype=torch.int64, device=device).random_(
        -(2**63), None, generator=noise
    )
    grey = bits.view(torch.uint8)[: n * size * size].view(n, size, size) & 15
    ramp = torch.linspace(0, 1, size, device=device)
    amplitude = backdrop.shade.abs()[..., None]
    shading = torch.where(backdrop.shade[..., None] >= 0, ramp, 1 - ramp) * amplitude  # (n, 2, size)
    grey += shading[:, 0, None, :].round().to(torch.uint8)
    grey += shading[:, 1, :, None].round().to(torch.uint8)
    canvas = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    base = backdrop.base.round().to(torch.uint8)
    for channel in range(3):
        torch.add(grey, base[:, channel, None, None], out=canvas[:, channel])
    return canvas


def _render(
    backdrop: _Backdrop, objects: _Prims, code: _Prims | None, size: int, window: int, seed: int
) -> tuple[Tensor, Tensor | None]:
    """Paint the scenes: (n * frames, 3, size, size) uint8 canvases and, for images, their patch labels (n, 576).

    Images come with code glyphs (possibly all inactive), video without.
    """
    n, frames = objects.active.shape[:2]
    noise = torch.Generator(device=backdrop.base.device).manual_seed(seed)
    canvas = _background(backdrop, size, noise)
    for k in range(_CLUTTER_SLOTS):  # blobs may overlap one another: one slot at a time
        _paint(canvas, backdrop.clutter.apply(lambda x, k=k: x[:, 0, k : k + 1]), _CLUTTER_WINDOW, _shape_sdf)
    canvas = canvas.repeat_interleave(frames, 0) if frames > 1 else canvas
    if code is None:
        _paint(canvas, objects.apply(lambda x: x.flatten(0, 1)), window, _shape_sdf)
        return canvas, None
    labels = torch.zeros(n, (size // PATCH) ** 2, dtype=torch.long, device=canvas.device)
    _paint(canvas, objects.apply(lambda x: x.flatten(0, 1)), window, _shape_sdf, labels)
    _paint(canvas, code.apply(lambda x: x.flatten(0, 1)), _CODE_WINDOW, _digit_sdf, labels)
    return canvas, labels


# ---------------------------------------------------------------------------------------------- public API


def tasks(kind: str = "image") -> tuple[str, ...]:
    """The task names of `kind` ("image" or "video")."""
    if kind == "image":
        return IMAGE_TASKS
    if kind == "video":
        return VIDEO_TASKS
    raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")


def _check(kind: str, n: int, task: str | None, frames: int) -> tuple[str, ...]:
    """The tasks to sample, round-robin; ValueError on an invalid kind, n, task or frame count."""
    valid = tasks(kind)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if task is not None and task not in valid:
        raise ValueError(f"unknown {kind} task {task!r}; valid: {', '.join(valid)}")
    if kind == "video" and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 2):
        raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
    return valid if task is None else (task,)


def render_batch(
    kind: str,
    n: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    task: str | None = None,
    frames: int = 8,
) -> Batch:
    """Render n samples of `task`, or of all `kind` tasks round-robin (sample i gets task i % len) when None.

    Scene parameters are drawn from `generator` (on its own device), pixels are rendered on `device`; the same
    generator state gives the same scenes on any device (the background grain comes from a generator of
    `device` seeded from `generator`, so it differs between CPU and CUDA). `frames` (>= 2) applies to video.
    """
    names = _check(kind, n, task, frames)
    image = kind == "image"
    frames, size = (1, IMAGE_SIZE) if image else (frames, VIDEO_SIZE)
    parts, order, labels = [], [], []
    for position, name in enumerate(names):
        members = list(range(position, n, len(names)))
        if members:
            m = len(members)
            parts.append(_IMAGE_SAMPLERS[name](generator, m) if image else _VIDEO_SAMPLERS[name](generator, m, frames))
            order += members
            labels += [name] * m
    backdrop = _backdrop(generator, n, size)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    rows = torch.tensor(order, device=generator.device).argsort()  # concatenated row of each sample

    def gather(prims: list[_Prims]) -> _Prims:
        return _Prims.cat(prims).apply(lambda x: x[rows].to(device))

    objects = gather([p.objects for p in parts])
    code = None
    if image:
        code = gather([_no_code(len(p.questions), generator.device) if p.code is None else p.code for p in parts])
    canvas, patch_labels = _render(backdrop.to(device), objects, code, size, _OBJECT_WINDOW[kind], seed)
    questions = [q for p in parts for q in p.questions]
    answers = [a for p in parts for a in p.answers]
    pick = rows.tolist()
    questions, answers, labels = [questions[i] for i in pick], [answers[i] for i in pick], [labels[i] for i in pick]
    if image:
        return Batch(canvas, questions, answers, labels, patch_labels.view(n, size // PATCH, size // PATCH))
    return Batch(canvas.view(n, frames, 3, size, size), questions, answers, labels, None)


def _to_pil(frames: Tensor) -> list[Image.Image]:
    return [Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()) for frame in frames]


def generate(kind: str = "image", n: int = 16, seed: int = 0, task: str | None = None, frames: int = 8) -> list[Sample]:
    """n samples of `task`, or spread round-robin over all `kind` tasks when None, videos of `frames` frames;
    deterministic in `seed`.

    Renders on CPU through :func:`render_batch` (in chunks of 120 samples), so any seed gives a fresh split
    drawn from the same distribution as training batches.
    """
    _check(kind, n, task, frames)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, n, _CHUNK):
        batch = render_batch(kind, min(_CHUNK, n - start), generator, "cpu", task, frames)
        for i, (question, answer, name) in enumerate(zip(batch.questions, batch.answers, batch.tasks, strict=True)):
            if kind == "image":
                samples.append(Sample(name, question, answer, _to_pil(batch.pixels[i : i + 1]), None))
            else:
                samples.append(Sample(name, question, answer, None, _to_pil(batch.pixels[i])))
    return samples
