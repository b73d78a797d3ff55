"""The probe set as lmms-eval tasks, written on first use into a cache folder: no network, same data every time.

`tasks_path()` returns the folder to pass as lmms-eval's `--include_path`. It holds one task per probe task
(`mmtoken_probe_count`, ..., `mmtoken_probe_needle`), the groups `mmtoken_probe_image` and `mmtoken_probe_video`
over all of them, and for each embedded probe model a group over the tasks it is reliable on
(`mmtoken_probe_llava_reliable`): a method is judged on those, and the rest show where the model itself fails.
Probe world v2's tasks (`mmtoken.zoo.world`) come as `mmtoken_probe_world_exist`, ..., with at least 500 samples
per setting, and the groups `mmtoken_probe_world_image` (every image task but counting, which is reported on its
own as a stress task) and `mmtoken_probe_world_video`. Images are PNG files, videos lossless MP4 files (decoded
like any benchmark's videos); samples come from each world's `generate` with a fixed seed, so every machine writes
the same questions and pixels.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track

from mmtoken.zoo import probe, world
from mmtoken.zoo.embedded import RELIABLE_TASKS

SEED = 4242
PER_TASK = {"image": 100, "video": 167}  # video: 501 samples per setting over three tasks
# Long videos for the KV presses, where which chunk of frames holds the answer matters: the needle task (the one
# whose answer the 8-frame probe model still finds in 64 and 128 frames, 94% unpatched) at those lengths.
LONG_VIDEOS = {"needle_64f": ("needle", 64), "needle_128f": ("needle", 128)}
PER_LONG_TASK = 32
# probe world v2: 9 image tasks of 60 samples and 4 video tasks of 125, so every setting has at least 500
WORLD_PER_TASK = {"image": 60, "video": 125}
WORLD = "world_"
VIDEO_FPS = 4
VERSION = 4  # bump when the data or the YAML changes, so caches are written anew
METRIC = "exact_match"
MAX_NEW_TOKENS = 6
_FUNCTIONS = "mmtoken.evaluation.probe_tasks"


def task_name(task: str) -> str:
    return f"mmtoken_probe_{task}"


def task_kind(name: str) -> str | None:
    """The kind ("image" or "video") of the probe task of either world (long videos included) that lmms-eval knows
    as `name`; None for another task."""
    for _, kind, _, _, _, label in _sources():
        if name == task_name(label):
            return kind
    return None


def reliable_group(model: str) -> str:
    """The group over the tasks that embedded model `model` answers reliably unpatched."""
    return "mmtoken_" + model.replace("-", "_") + "_reliable"


def cache_root() -> Path:
    """`$MMTOKEN_CACHE`, else `$XDG_CACHE_HOME/mmtoken`, else `~/.cache/mmtoken`."""
    if "MMTOKEN_CACHE" in os.environ:
        return Path(os.environ["MMTOKEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmtoken"


def tasks_path() -> Path:
    """The lmms-eval task folder, written (about half a minute on 2 cores) the first time it is asked for."""
    folder = cache_root() / f"lmms-tasks-v{VERSION}"
    if not (folder / "COMPLETE").exists():
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        _write(staging, folder)
        (staging / "COMPLETE").touch()
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: its copy is the same
            shutil.rmtree(staging)
    return folder


def _sources() -> list[tuple]:
    """Every task to write: (world module, kind, task it draws, frames, samples, label of its files and name)."""
    sources = [(probe, kind, task, 8, PER_TASK[kind], task) for kind in PER_TASK for task in probe.tasks(kind)]
    sources += [(probe, "video", task, frames, PER_LONG_TASK, name) for name, (task, frames) in LONG_VIDEOS.items()]
    sources += [(world, kind, task, 8, WORLD_PER_TASK[kind], WORLD + task)
                for kind in WORLD_PER_TASK for task in world.tasks(kind)]  # fmt: skip
    return sources


def _write(staging: Path, final: Path) -> None:
    """Data and YAML into `staging`; paths inside point at `final`, where the folder is renamed to."""
    progress = Console(stderr=True)  # stdout carries the folder, for `--include_path "$(mmtoken tasks-path)"`
    for module, kind, drawn, frames, count, task in track(_sources(), description="writing the probe tasks",
                                                          console=progress):  # fmt: skip
        samples = module.generate(kind, n=count, seed=SEED, task=drawn, frames=frames)
        media = staging / "data" / task
        media.mkdir(parents=True)
        docs = []
        for index, sample in enumerate(samples):
            file = f"{index:04d}." + ("png" if kind == "image" else "mp4")
            if kind == "image":
                sample.images[0].save(media / file, compress_level=1)
            else:
                _write_video(sample.video, media / file)
            docs.append({"id": index, "task": task, "question": sample.question, "answer": sample.answer,
                         "kind": kind, "path": str(final / "data" / task / file)})  # fmt: skip
        (staging / "data" / f"{task}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (staging / f"{task_name(task)}.yaml").write_text(_task_yaml(task, final / "data" / f"{task}.jsonl"))
    suite = [task for group, tasks in world.TASK_GROUPS.items() if group != "counting" for task in tasks]
    groups = {"mmtoken_probe_image": probe.tasks("image"), "mmtoken_probe_video": probe.tasks("video"),
              "mmtoken_probe_world_image": tuple(WORLD + task for task in suite),
              "mmtoken_probe_world_video": tuple(WORLD + task for task in world.tasks("video"))}  # fmt: skip
    groups |= {reliable_group(model): tasks for model, tasks in RELIABLE_TASKS.items()}
    for group, tasks in groups.items():
        (staging / f"{group}.yaml").write_text(_group_yaml(group, tasks))


def _write_video(frames: list[Image.Image], path: Path) -> None:
    """Lossless H.264 in RGB (libx264rgb, qp 0): decoding gives back the rendered pixels exactly."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=VIDEO_FPS, options={"qp": "0"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "rgb24"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _task_yaml(task: str, data: Path) -> str:
    return f"""task: {task_name(task)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_messages: !function {_FUNCTIONS}.doc_to_messages
doc_to_visual: !function {_FUNCTIONS}.doc_to_visual
doc_to_text: !function {_FUNCTIONS}.doc_to_text
doc_to_target: answer
process_results: !function {_FUNCTIONS}.process_results
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
metric_list:
  - metric: {METRIC}
    aggregation: mean
    higher_is_better: true
metadata:
  version: {VERSION}
"""


def _group_yaml(group: str, tasks: tuple[str, ...]) -> str:
    members = "".join(f"  - {task_name(task)}\n" for task in tasks)
    return f"""group: {group}
task:
{members}aggregate_metric_list:
  - metric: {METRIC}
    aggregation: mean
    weight_by_size: true
metadata:
  version: {VERSION}
"""


# Functions the YAML names (lmms-eval imports them by module path).


def doc_to_visual(doc: dict) -> list:
    return [Image.open(doc["path"]).convert("RGB")] if doc["kind"] == "image" else [doc["path"]]


def doc_to_text(doc: dict) -> str:
    return doc["question"]


def doc_to_messages(doc: dict) -> list[dict]:
    """One user turn: the image (a PIL image) or the video (a file path), then the question."""
    (visual,) = doc_to_visual(doc)
    content = [{"type": doc["kind"], "url": visual}, {"type": "text", "text": doc["question"]}]
    return [{"role": "user", "content": content}]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {METRIC: float(results[0].strip().lower() == doc["answer"])}
