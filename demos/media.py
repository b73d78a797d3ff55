"""What the demo accepts as media: an uploaded image or video, or a rendered probe example, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageSequence, UnidentifiedImageError

from mmtoken.zoo import probe

MAX_BYTES = 20 * 2**20
MAX_FRAMES = 16


@dataclass
class Media:
    """One image (`frames` holds it alone) or one video (its frames, at most MAX_FRAMES, evenly spaced)."""

    kind: str
    frames: list[Image.Image]


def read_media(path: str | Path | None) -> Media:
    """The image or video in the file at `path`; ValueError for no file, a file over MAX_BYTES, or one that is
    neither. Multi-frame images (animated GIF, WebP, PNG) count as videos; other videos are decoded with PyAV."""
    if path is None:
        raise ValueError("upload an image or a video, or pick a probe example")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.1f} MiB; the limit is {MAX_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as opened:
            frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(opened)]
    except (UnidentifiedImageError, OSError):
        frames = _decode_video(path)
    if len(frames) == 1:
        return Media("image", frames)
    if len(frames) > MAX_FRAMES:
        frames = [frames[index * len(frames) // MAX_FRAMES] for index in range(MAX_FRAMES)]
    return Media("video", frames)


def _decode_video(path: Path) -> list[Image.Image]:
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as error:
        raise ValueError(f"{path.name} is neither an image nor a video") from error
    if not frames:
        raise ValueError(f"{path.name} holds no video frames")
    return frames


def probe_examples() -> list[str]:
    """The probe example picker's choices: every image and video task, as "kind: task"."""
    return [f"{kind}: {task}" for kind in ("image", "video") for task in probe.tasks(kind)]


def write_probe_example(choice: str, seed: int, folder: Path) -> tuple[Path, str, str]:
    """Render the probe example `choice` ("kind: task") for `seed` into `folder`, losslessly (PNG for an image,
    animated WebP for a video); returns the file, its question and its true answer."""
    kind, task = choice.split(": ")
    sample = probe.generate(kind, n=1, seed=seed, task=task)[0]
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"probe-{kind}-{task}-{seed}.{'png' if kind == 'image' else 'webp'}"
    if kind == "image":
        sample.images[0].save(file)
    else:
        first, *rest = sample.video
        first.save(file, save_all=True, append_images=rest, lossless=True, duration=250, loop=0)
    return file, sample.question, sample.answer
