"""Pictures of one comparison column: visual tokens alive per layer, and which patches survive at each stage."""

from __future__ import annotations

from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from mmtoken.demos.media import Media

PANEL = 168
CAPTION = 16
DIMMED = 0.2


def tokens_chart(per_layer: list[float], reference: list[float], label: str) -> Figure:
    """Visual tokens alive at each decoder layer under `label`, with the unpatched model's as a dashed line."""
    figure = Figure(figsize=(4, 2.6), dpi=100)
    axis = figure.add_subplot()
    layers = range(len(per_layer) + 1)  # each step spans its layer, the last one included
    if label != "unpatched":
        axis.step(layers, [*reference, reference[-1]], where="post", linestyle="--", color="grey", label="unpatched")
    axis.step(layers, [*per_layer, per_layer[-1]], where="post", color="tab:blue", label=label)
    axis.set(xlabel="decoder layer", ylabel="visual tokens", ylim=(0, 1.05 * max(reference)))
    axis.legend(loc="lower left", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def model_view(image: Image.Image, center_crop: bool) -> Image.Image:
    """The part of `image` the vision tower sees: its central square when the processor center-crops."""
    if not center_crop:
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def survival_overlay(
    media: Media, alive: dict[str, list[list[int]]], grid: list[list[int]], center_crop: bool
) -> Image.Image:
    """One row of panels per stage, captioned with its first layer and the tokens alive, and one panel per media
    item and frame of the patch grid: the picture with the patches that no longer take part dimmed.

    `alive` maps each stage's first layer to the (media, frame, row, column) of its visual tokens, `grid` lists
    every visual token of the input the same way (the unpatched stage 0)."""
    shapes: dict[tuple[int, int], tuple[int, int]] = {}
    for item, frame, row, column in grid:
        if column >= 0:
            rows, columns = shapes.get((item, frame), (0, 0))
            shapes[(item, frame)] = (max(rows, row + 1), max(columns, column + 1))
    panels = sorted(shapes)
    frames_per_item = {item: 1 + max(frame for i, frame in panels if i == item) for item, _ in panels}
    pictures = []
    for item, frame in panels:
        source = media.frames[min(len(media.frames) - 1, frame * len(media.frames) // frames_per_item[item])]
        pictures.append(model_view(source, center_crop).convert("RGB").resize((PANEL, PANEL)))
    stages = sorted(alive, key=int)
    canvas = Image.new("RGB", (len(panels) * PANEL, len(stages) * (PANEL + CAPTION)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, stage in enumerate(stages):
        top = y * (PANEL + CAPTION)
        draw.text((4, top + 2), f"from layer {stage}: {len(alive[stage])} visual tokens", fill="black")
        for x, (panel, picture) in enumerate(zip(panels, pictures, strict=True)):
            rows, columns = shapes[panel]
            mask = Image.new("L", (PANEL, PANEL), 0)
            cells = ImageDraw.Draw(mask)
            for item, frame, row, column in alive[stage]:
                if (item, frame) == panel and column >= 0:
                    left, upper = column * PANEL // columns, row * PANEL // rows
                    right, lower = (column + 1) * PANEL // columns - 1, (row + 1) * PANEL // rows - 1
                    cells.rectangle((left, upper, right, lower), fill=255)
            dimmed = picture.point(lambda value: int(value * DIMMED))
            canvas.paste(Image.composite(picture, dimmed, mask), (x * PANEL, top + CAPTION))
    return canvas
