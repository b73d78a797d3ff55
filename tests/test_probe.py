"""Tests for the procedural probe set (mmtoken.zoo.probe): determinism, vocabulary, balance, pixels vs answers."""

from __future__ import annotations

import time
from collections import Counter
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from mmtoken.zoo.probe import COLORS, IMAGE_TASKS, VIDEO_TASKS, VOCABULARY, Batch, generate, render_batch, tasks

PALETTE = torch.tensor(((220, 30, 30), (30, 170, 60), (40, 90, 235), (245, 225, 40), (150, 50, 200), (255, 140, 0),
                        (245, 245, 245)))  # fmt: skip
PER_TASK = 48


@cache
def batch(kind: str, task: str, n: int = PER_TASK, seed: int = 0, frames: int = 8) -> Batch:
    torch.set_num_threads(2)
    return render_batch(kind, n, torch.Generator().manual_seed(seed), task=task, frames=frames)


def near(pixels: torch.Tensor, color: str, tolerance: int = 40) -> torch.Tensor:
    """(..., H, W) bool: pixels (..., 3, H, W) within `tolerance` levels of the palette colour on every channel."""
    rgb = PALETTE[COLORS.index(color)].view(3, 1, 1).short()
    return ((pixels.short() - rgb).abs() <= tolerance).all(-3)


def components(mask: torch.Tensor) -> list[int]:
    """The number of 8-connected components of each mask (k, H, W), ignoring specks, on a 4x coarser grid.

    The renderer keeps objects 16 px apart, so coarsening neither joins nor splits them.
    """
    coarse = F.max_pool2d(mask[:, None].float(), 4)[:, 0]
    k, height, width = coarse.shape
    ids = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, height, width) * coarse
    while True:
        grown = F.max_pool2d(ids[:, None], 3, 1, 1)[:, 0] * coarse
        if torch.equal(grown, ids):
            break
        ids = grown
    return [int((ids[i][coarse[i] > 0].unique(return_counts=True)[1] >= 2).sum()) for i in range(k)]


def centroid(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = mask.nonzero(as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def test_vocabulary_and_tasks():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    assert all(word.isalnum() and word == word.lower() for word in VOCABULARY)
    assert tasks() == tasks("image") == IMAGE_TASKS == ("count", "color", "locate", "exist", "read", "relation")
    assert tasks("video") == VIDEO_TASKS == ("motion", "order", "events", "needle")


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: tasks("audio"), "'image' or 'video'"),
        (lambda: generate("image", 2, task="motion"), "count, color, locate"),
        (lambda: generate("video", 2, task="count"), "motion, order, events, needle"),
        (lambda: generate("image", 0), "positive integer"),
        (lambda: generate("image", 2.5), "positive integer"),
        (lambda: render_batch("video", 2, torch.Generator(), frames=1), ">= 2"),
    ],
)
def test_invalid_arguments_name_the_valid_ones(call, named):
    with pytest.raises(ValueError, match=named):
        call()


def test_deterministic_in_seed():
    first, again = (render_batch("image", 12, torch.Generator().manual_seed(5)) for _ in range(2))
    other = render_batch("image", 12, torch.Generator().manual_seed(6))
    assert torch.equal(first.pixels, again.pixels) and torch.equal(first.patch_labels, again.patch_labels)
    assert first.answers == again.answers and first.questions == again.questions
    assert not torch.equal(first.pixels, other.pixels) and first.questions != other.questions
    videos = [generate("video", 4, seed=seed) for seed in (1, 1, 2)]
    frames = [[frame.tobytes() for sample in run for frame in sample.video] for run in videos]
    assert frames[0] == frames[1] != frames[2]


def test_generate_gives_pil_samples_round_robin():
    images = generate("image", 8, seed=0)
    assert [s.task for s in images] == [*IMAGE_TASKS, *IMAGE_TASKS[:2]]
    assert all(s.video is None and len(s.images) == 1 and s.images[0].size == (336, 336) for s in images)
    assert images[0].images[0].mode == "RGB"
    videos = generate("video", 5, seed=0, task="events")
    assert {s.task for s in videos} == {"events"}
    assert all(s.images is None and len(s.video) == 8 and s.video[0].size == (224, 224) for s in videos)


def test_batch_layout_and_samples_differ():
    images = render_batch("image", 8, torch.Generator().manual_seed(0))
    assert images.pixels.shape == (8, 3, 336, 336) and images.pixels.dtype == torch.uint8
    assert images.patch_labels.shape == (8, 24, 24) and images.patch_labels.dtype == torch.long
    assert images.tasks == [*IMAGE_TASKS, *IMAGE_TASKS[:2]]
    video = render_batch("video", 4, torch.Generator().manual_seed(0), frames=5)
    assert video.pixels.shape == (4, 5, 3, 224, 224) and video.patch_labels is None
    for pixels in (images.pixels, video.pixels):
        flat = pixels.flatten(1).float()
        assert (torch.cdist(flat, flat) + torch.eye(len(flat)) > 0).all()  # no two samples alike


@pytest.mark.parametrize(("kind", "task"), [("image", t) for t in IMAGE_TASKS] + [("video", t) for t in VIDEO_TASKS])
def test_words_in_vocabulary_and_answers_balanced(kind, task):
    rendered = batch(kind, task)
    assert rendered.tasks == [task] * PER_TASK
    words = set(VOCABULARY)
    for text in rendered.questions + rendered.answers:
        assert text == " ".join(text.split()) and set(text.split()) <= words, text
    answers = Counter(rendered.answers)
    expected = {
        "count": ({str(k) for k in range(1, 7)}, 5),
        "color": (set(COLORS), 5),
        "locate": ({f"{r} {c}" for r in ("top", "middle", "bottom") for c in ("left", "center", "right")}, 7),
        "exist": ({"yes", "no"}, 2),
        "relation": ({"left", "right", "above", "below"}, 4),
        "motion": ({"left", "right", "up", "down"}, 4),
        "order": (set(COLORS), 5),
        "events": ({"1", "2", "3", "4"}, 4),
        "needle": (set(COLORS), 5),
    }
    if task == "read":
        codes = [answer.split() for answer in rendered.answers]
        assert all(len(code) == 3 and all(d.isdigit() for d in code) for code in codes)
        assert len({d for code in codes for d in code}) >= 8
    else:
        valid, least = expected[task]
        assert set(answers) <= valid and len(answers) >= least, answers
    assert max(answers.values()) <= PER_TASK * 0.6


def test_color_answer_is_in_the_pixels_and_labels():
    rendered = batch("image", "color")
    for pixels, answer, labels in zip(rendered.pixels, rendered.answers, rendered.patch_labels, strict=True):
        assert near(pixels, answer, 8).sum() >= 100
        assert (labels == COLORS.index(answer) + 1).any()


def test_palette_pixels_lie_in_labelled_patches():
    rendered = batch("image", "count")
    exact = torch.stack([near(rendered.pixels, color, 0) for color in COLORS]).any(0)  # (n, H, W)
    covered = F.max_pool2d(exact[:, None].float(), 14)[:, 0] > 0
    assert covered.any() and (rendered.patch_labels[covered] > 0).all()


def test_locate_target_in_answered_cell():
    rendered = batch("image", "locate")
    for pixels, question, answer in zip(rendered.pixels, rendered.questions, rendered.answers, strict=True):
        row, column = answer.split()
        top, left = 112 * ("top", "middle", "bottom").index(row), 112 * ("left", "center", "right").index(column)
        mask = near(pixels, question.split()[3])
        assert mask[top : top + 112, left : left + 112].sum() >= 100
        if mask.sum() == mask[top : top + 112, left : left + 112].sum():  # the colour is the target's alone
            x, y = centroid(mask)
            assert left + 8 < x < left + 104 and top + 8 < y < top + 104


def test_count_matches_components():
    rendered = batch("image", "count")
    colors = [question.split()[2] for question in rendered.questions]
    masks = torch.stack([near(p, c) for p, c in zip(rendered.pixels, colors, strict=True)])
    for found, answer in zip(components(masks), rendered.answers, strict=True):
        assert int(answer) <= found <= int(answer) + 3  # targets plus at most three same-colour distractors


def test_relation_matches_centroids():
    rendered = batch("image", "relation")
    checked = 0
    for pixels, question, answer in zip(rendered.pixels, rendered.questions, rendered.answers, strict=True):
        words = question.split()
        masks = torch.stack([near(pixels, words[3]), near(pixels, words[8])])
        if words[3] == words[8] or components(masks) != [1, 1]:
            continue
        (x1, y1), (x2, y2) = centroid(masks[0]), centroid(masks[1])
        dx, dy = x1 - x2, y1 - y2
        assert {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[answer]
        major, minor = (abs(dx), abs(dy)) if answer in ("left", "right") else (abs(dy), abs(dx))
        assert major > 3 * minor
        checked += 1
    assert checked >= 5


def test_events_flash_count_in_frames():
    rendered = batch("video", "events")
    for video, answer in zip(rendered.pixels, rendered.answers, strict=True):
        lit = near(video, "yellow", 8).sum((-2, -1))  # (frames,)
        on = lit > lit.min() + 50
        assert int(on.sum()) == int(answer) and not (on[1:] & on[:-1]).any()


def test_events_fit_few_frames():
    rendered = batch("video", "events", frames=3)
    assert rendered.pixels.shape[1] == 3 and set(rendered.answers) == {"1", "2"}


def test_needle_color_shows_in_one_frame():
    rendered = batch("video", "needle")
    for video, answer in zip(rendered.pixels, rendered.answers, strict=True):
        shown = near(video, answer, 8).sum((-2, -1))
        assert int((shown > shown.min() + 50).sum()) == 1


def test_order_first_color_appears_first():
    rendered = batch("video", "order")
    for video, answer in zip(rendered.pixels, rendered.answers, strict=True):
        seen = near(video, answer, 8).sum((-2, -1))
        assert seen[0] < seen[-1] or seen[0] > 50  # appears during the clip, or is there from the start


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_renders_the_same_scenes():
    for kind in ("image", "video"):
        cpu = render_batch(kind, 12, torch.Generator().manual_seed(3))
        gpu = render_batch(kind, 12, torch.Generator().manual_seed(3), device="cuda")
        assert gpu.pixels.is_cuda and gpu.pixels.shape == cpu.pixels.shape and gpu.pixels.dtype == torch.uint8
        assert gpu.questions == cpu.questions and gpu.answers == cpu.answers
        assert (gpu.pixels.cpu().float() - cpu.pixels.float()).abs().mean() < 12  # only the grain differs
        if kind == "image":
            assert (gpu.patch_labels.cpu() == cpu.patch_labels).float().mean() > 0.99
    on_gpu = torch.Generator(device="cuda").manual_seed(0)
    assert render_batch("image", 4, on_gpu, device="cuda").pixels.is_cuda


def test_cpu_throughput(capsys):
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    render_batch("image", 16, generator)
    start = time.perf_counter()
    render_batch("image", 256, generator)
    with capsys.disabled():
        print(f"\nprobe: {256 / (time.perf_counter() - start):.0f} images/s (336 px, n=256, CPU)")
