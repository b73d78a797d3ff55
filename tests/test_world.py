"""Tests for probe world v2 (mmtoken.zoo.world): every answer re-derived from the scene's object table, the
geometry the module promises (sizes, visibility, slow video), pixels that show the objects, determinism."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from mmtoken.zoo.world import (
    COLORS,
    IMAGE_TASKS,
    MATERIALS,
    SHAPES,
    SIZES,
    TASK_GROUPS,
    VIDEO_TASKS,
    VOCABULARY,
    Scenes,
    generate,
    render_batch,
    tasks,
)

PER_TASK = 40
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")


@cache
def scenes(kind: str, task: str, frames: int = 8, seed: int = 0) -> Scenes:
    torch.set_num_threads(2)
    return render_batch(kind, PER_TASK, torch.Generator().manual_seed(seed), task=task, frames=frames)


def table(batch: Scenes, i: int, frame: int = 0) -> list[dict]:
    """The active objects of scene i at `frame`: cell, attribute names, centre and half width."""
    o = batch.objects
    return [{"cell": c, "color": COLORS[o.color[i, c]], "shape": SHAPES[o.shape[i, c]] if o.shape[i, c] < 3 else "star",
             "material": MATERIALS[o.material[i, c]], "size": SIZES[int(o.large[i, c])],
             "centre": o.centre[i, frame, c].tolist(), "half": float(o.half[i, c])}
            for c in o.active[i, frame].nonzero().squeeze(1).tolist()]  # fmt: skip


def named(objects: list[dict], color: str, shape: str) -> list[dict]:
    return [o for o in objects if o["color"] == color and o["shape"] == shape]


def test_tasks_groups_and_vocabulary():
    assert tasks() == tasks("image") == IMAGE_TASKS
    assert set(IMAGE_TASKS) == {t for group in TASK_GROUPS.values() for t in group}
    assert TASK_GROUPS["counting"] == ("count",)  # reported apart, as a stress task
    assert tasks("video") == VIDEO_TASKS
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    for kind, names in (("image", IMAGE_TASKS), ("video", VIDEO_TASKS)):
        for task in names:
            batch = scenes(kind, task)
            words = " ".join(batch.questions + batch.answers + batch.captions).split()
            assert set(words) <= set(VOCABULARY), task


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_image_answers_follow_from_the_scene(task):
    batch = scenes("image", task)
    assert batch.tasks == [task] * PER_TASK and batch.patch_labels is None
    for i, (question, answer) in enumerate(zip(batch.questions, batch.answers, strict=True)):
        objects = table(batch, i)
        words = question.split()
        if task == "exist":
            assert answer == ("yes" if named(objects, words[3], words[4]) else "no")
        elif task == "shape":
            (target,) = [o for o in objects if o["color"] == words[4]]
            assert answer == target["shape"]
        elif task == "color":
            (target,) = [o for o in objects if o["size"] == words[4] and o["shape"] == words[5]]
            assert answer == target["color"]
        elif task in ("material", "size", "locate"):
            (target,) = named(objects, words[-2], words[-1])
            place = f"{ROWS[target['cell'] // 3]} {COLUMNS[target['cell'] % 3]}"
            assert answer == {"material": target["material"], "size": target["size"], "locate": place}[task]
        elif task == "relation":
            (a,) = named(objects, words[3], words[4])
            (b,) = named(objects, words[-2], words[-1])
            (ax, ay), (bx, by) = a["centre"], b["centre"]
            horizontal = a["cell"] // 3 == b["cell"] // 3
            assert horizontal or a["cell"] % 3 == b["cell"] % 3
            expected = ("left" if ax < bx else "right") if horizontal else ("above" if ay < by else "below")
            assert answer == expected
        elif task == "read":
            assert batch.codes[i].tolist() == [int(d) for d in answer.split()]
            assert f"sign {answer}" in batch.captions[i]
        elif task == "count":
            counted = [o for o in objects if (o["shape"] + "s" == words[2]) or o["color"] == words[2]]
            assert answer == str(len(counted))
        if task != "read":
            assert (batch.codes[i] == -1).all()


def test_answers_are_balanced_enough_to_need_the_image():
    batch = render_batch("image", 9 * 60, torch.Generator().manual_seed(3))
    for task in IMAGE_TASKS:
        answers = [a for a, t in zip(batch.answers, batch.tasks, strict=True) if t == task]
        most = max(answers.count(a) for a in set(answers))
        assert most / len(answers) < 0.65, task


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_objects_span_many_patches_stay_on_the_canvas_and_mostly_visible(task):
    batch = scenes("image", task)
    for i in range(PER_TASK):
        objects = table(batch, i)
        for o in objects:
            low, high = (22, 30) if o["size"] == "small" else (40, 50)
            assert low <= o["half"] <= high  # 3 to 7 patches of 14 px across
            assert all(o["half"] <= v <= 336 - o["half"] for v in o["centre"])
        for a in objects:  # a box covers at most half of a box behind it
            for b in objects:
                if a["cell"] > b["cell"]:
                    side = 2 * b["half"]
                    ox, oy = (min(side, max(0.0, a["half"] + b["half"] - abs(p - q)))
                              for p, q in zip(a["centre"], b["centre"], strict=True))  # fmt: skip
                    assert ox * oy <= 0.5 * side**2


def test_pixels_show_each_front_object_in_its_colour():
    """The middle of every matte object in the front row (which nothing hides) is nearest its palette colour."""
    palette = torch.tensor(((220, 30, 30), (30, 170, 60), (40, 90, 235), (245, 225, 40), (150, 50, 200),
                            (255, 140, 0), (245, 245, 245)), dtype=torch.float32)  # fmt: skip
    checked = 0
    for task in IMAGE_TASKS:
        batch = scenes("image", task)
        for i in range(PER_TASK):
            for o in table(batch, i):
                if o["cell"] < 6 or o["material"] != "matte" or o["shape"] == "triangle":
                    continue
                x, y = (round(v) for v in o["centre"])
                mean = batch.pixels[i, :, y - 4 : y + 4, x - 4 : x + 4].float().mean((1, 2))
                chroma = (palette / palette.norm(dim=1, keepdim=True)) @ (mean / mean.norm())
                assert COLORS[int(chroma.argmax())] == o["color"], (task, i, o, mean)
                checked += 1
    assert checked > 30


def test_blank_scenes_differ_from_scenes_with_objects_only_where_objects_are():
    batch = scenes("image", "shape")
    # the floor behind objects varies smoothly: a 14-px patch of floor far from every object has little spread
    far = []
    for i in range(PER_TASK):
        centres = [(o["centre"], o["half"]) for o in table(batch, i)]
        patch = batch.pixels[i, :, 322:336, 0:14].float()
        if all(abs(c[0] - 7) > h + 20 or abs(c[1] - 329) > h + 60 for c, h in centres):
            far.append(patch.std(dim=(1, 2)).max())
    assert far and max(far) < 30


@pytest.mark.parametrize("task", VIDEO_TASKS)
@pytest.mark.parametrize("frames", [8, 64])
def test_video_answers_follow_from_the_scene_and_change_slowly(task, frames):
    batch = scenes("video", task, frames)
    assert batch.pixels.shape == (PER_TASK, frames, 3, 224, 224)
    o = batch.objects
    step = (o.centre[:, 1:] - o.centre[:, :-1]).abs().amax()
    assert step <= 40 / (frames - 1) + 1e-4  # at most 40 px over the whole clip
    for i, (question, answer) in enumerate(zip(batch.questions, batch.answers, strict=True)):
        words = question.split()
        if task == "motion":
            (target,) = named(table(batch, i), words[4], words[5])
            (x0, y0), (x1, y1) = target["centre"], table(batch, i, frames - 1)[table(batch, i).index(target)]["centre"]
            dx, dy = x1 - x0, y1 - y0
            assert max(abs(dx), abs(dy)) >= 24
            assert answer == (("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
        elif task == "order":
            first = {}
            for frame in range(frames):
                for obj in table(batch, i, frame):
                    first.setdefault((obj["color"], obj["shape"]), frame)
            a, b = first[words[4], words[5]], first[words[8], words[9]]
            assert a != b and answer == (words[4] if a < b else words[8])
        elif task == "events":
            lamp = ((o.color[i] == COLORS.index("yellow")) & (o.shape[i] == 1) & ~o.large[i]).nonzero()[0, 0]
            lit = (~o.dark[i, :, lamp]).tolist()
            flashes = sum(on and (f == 0 or not lit[f - 1]) for f, on in enumerate(lit))
            assert flashes == sum(lit) == int(answer)  # flashes one frame long, never in a row
        elif task == "needle":
            star = (o.shape[i] == 3).nonzero().squeeze(1)
            assert len(star) == 1 and int(o.active[i, :, star[0]].sum()) == 1
            assert answer == COLORS[o.color[i, star[0]]]
            still = (~o.active[i, :, star[0]]).nonzero().squeeze(1)  # frames without the star: a still scene
            assert all(torch.equal(batch.pixels[i, still[0]], batch.pixels[i, f]) for f in still.tolist())


def test_same_seed_same_scenes_and_errors_before_work():
    a, b = (render_batch("image", 9, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a.pixels, b.pixels) and a.questions == b.questions and a.captions == b.captions
    c = render_batch("image", 9, torch.Generator().manual_seed(6))
    assert not torch.equal(a.pixels, c.pixels)
    samples = generate("video", 4, seed=1, frames=3)
    assert [s.task for s in samples] == list(VIDEO_TASKS) and len(samples[0].video) == 3
    assert samples[0].video[0].size == (224, 224) and samples[0].images is None
    for kwargs, message in (({"kind": "audio"}, "kind"), ({"n": 0}, "n must"), ({"task": "jump"}, "unknown image"),
                            ({"kind": "video", "frames": 1}, "frames")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            generate(**{"kind": "image", "n": 2, **kwargs})
