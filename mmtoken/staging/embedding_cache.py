"""The embedding cache: a prompt's media through the vision tower once, its features reused whenever the same media
come again with the same processor settings."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_leaves

from mmtoken.encoding import Encoded

MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw",
                "batch_num_images", "second_per_grid_ts")  # fmt: skip


def media_key(inputs: dict, settings: dict) -> str:
    """A content hash of the media of one request's processed `inputs` (pixels, sizes, grids) and the processor
    `settings` that made them (sizes, resampling, normalisation), so equal media under other settings differ."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in MEDIA_INPUTS:
        value = inputs.get(name)
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoded_bytes(encoded: Encoded) -> int:
    """Bytes of the tensors an encoding holds."""
    leaves = tree_leaves((encoded.features, encoded.signals))
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves if torch.is_tensor(leaf))


class EmbeddingCache:
    """Encodings by media key, at most `max_bytes` of them; the least recently used leave first. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the embedding cache's size is a number of bytes >= 0, got {max_bytes}")
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: OrderedDict[str, tuple[Encoded, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def get(self, key: str) -> Encoded | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, encoded: Encoded) -> None:
        """Keep `encoded` under `key`, evicting the least recently used; one larger than the whole cache is not
        kept."""
        size = encoded_bytes(encoded)
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
            self._entries[key] = (encoded, size)
            self.bytes += size
