"""What the demo accepts as media: an uploaded image or video, or a rendered probe example, checked before any work.
A video decodes at most MAX_VIDEO_FRAMES frames of at most MAX_FRAME_PIXELS and keeps only its sampled frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmtoken.zoo import probe

MAX_BYTES = 20 * 2**20
MAX_FRAMES = 16
MAX_VIDEO_FRAMES = 3600  # two minutes at 30 frames a second
MAX_FRAME_PIXELS = 1920 * 1080  # full HD
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own limit, about 89 megapixels


@dataclass
class Media:
    """One image (`frames` holds it alone) or one video (its frames, at most MAX_FRAMES, evenly spaced)."""

    kind: str
    frames: list[Image.Image]


def sampled_frames(count: int) -> list[int]:
    """The indices of the frames kept from a video of `count` frames: all of them, or MAX_FRAMES evenly spaced."""
    return [index * count // MAX_FRAMES for index in range(MAX_FRAMES)] if count > MAX_FRAMES else list(range(count))


def read_media(path: str | Path | None) -> Media:
    """The image or video in the file at `path`; ValueError for no file, a file over MAX_BYTES, one that is
    neither, or one over the pixel and frame limits. Multi-frame images (animated GIF, WebP, PNG) count as
    videos; other videos are decoded with PyAV."""
    if path is None:
        raise ValueError("upload an image or a video, or pick a probe example")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{path.name} is {size / 2**20:.1f} MiB; the limit is {MAX_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as opened:
            frames = _read_image_frames(path, opened)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path.name} is an image of over {2 * MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels") from error  # fmt: skip
    except (UnidentifiedImageError, OSError, EOFError):  # not an image Pillow reads: maybe a video
        frames = _read_video(path)
    return Media("image" if len(frames) == 1 else "video", frames)


def _read_image_frames(path: Path, opened: Image.Image) -> list[Image.Image]:
    count = getattr(opened, "n_frames", 1)
    if count == 1 and opened.width * opened.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{path.name} is {opened.width}x{opened.height} pixels; "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels")  # fmt: skip
    if count > 1:
        _check_frame_count(path, count)
        _check_frame_size(path, opened.width, opened.height)
    frames = []
    for index in sampled_frames(count):
        opened.seek(index)
        frames.append(opened.convert("RGB"))
    return frames


def _check_frame_count(path: Path, count: int) -> None:
    if count > MAX_VIDEO_FRAMES:
        raise ValueError(f"{path.name} has over {MAX_VIDEO_FRAMES} frames; the limit is {MAX_VIDEO_FRAMES} frames")


def _check_frame_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise ValueError(f"{path.name} has frames of {width}x{height} pixels; "
                         f"the limit is {MAX_FRAME_PIXELS / 1e6:.1f} megapixels a frame")  # fmt: skip


def _read_video(path: Path) -> list[Image.Image]:
    """The sampled frames of the first video stream, from its packets counted without decoding, then one decoding
    pass that keeps only the sampled frames and stops after the last of them."""
    import av

    try:
        count = _count_video_packets(path)
        wanted = sampled_frames(count)
        frames = []
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                _check_frame_size(path, frame.width, frame.height)
                if index in wanted:
                    frames.append(frame.to_image())
                if index == wanted[-1]:
                    break
    except av.error.FFmpegError as error:
        raise ValueError(f"{path.name} is neither an image nor a video") from error
    if not frames:
        raise ValueError(f"{path.name} holds no video frames")
    return frames


def _count_video_packets(path: Path) -> int:
    """The frames of the first video stream, counted as its packets (demuxed, not decoded), checked as counted."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path.name} holds no video frames")
        stream = container.streams.video[0]
        _check_frame_size(path, stream.codec_context.width, stream.codec_context.height)
        count = 0
        for packet in container.demux(stream):
            count += packet.size > 0
            _check_frame_count(path, count)
    if not count:
        raise ValueError(f"{path.name} holds no video frames")
    return count


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
