"""An LRU cache of image embeddings, bounded in bytes, keyed by the image's content hash.

The image encoder is by far the most expensive step of promptable segmentation; the prompt decoder
is cheap. Keeping each image's embedding lets a second prompt on the same image skip the encoder,
and lets a client send back the ``image_id`` (the content hash) instead of the image.

The bound is in bytes rather than entries because one embedding of a ``vit_h`` model (4 MB) and one
of the ``tiny`` preset (64 KB) differ by 64x; a count bound would be either wasteful or unsafe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch


class HasNbytes(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=HasNbytes)


def image_sha256(image: torch.Tensor) -> str:
    """Content hash of a decoded image: sha256 hex of its shape and its ``CxHxW`` uint8 pixels.

    Hashing decoded pixels (not the uploaded file) makes the same picture sent as PNG or as a
    re-encoded PNG the same cache entry; the shape prefix keeps 2x8 and 4x4 images with equal bytes apart.
    """
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a CxHxW uint8 image, got {tuple(image.shape)} {image.dtype}")
    digest = hashlib.sha256("x".join(str(int(s)) for s in image.shape).encode() + b":")
    digest.update(image.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache counters (for ``GET /v1/models`` and the tests)."""

    capacity_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int
    rejected: int  # values larger than the whole capacity, never stored


class EmbeddingCache(Generic[V]):
    """Least-recently-used map ``key -> value``, holding at most ``capacity_bytes`` of ``value.nbytes``.

    Thread-safe. ``get`` refreshes recency; ``put`` evicts least recently used entries until the new
    value fits. A value larger than the whole capacity is not stored (``put`` returns False), so the
    bound always holds: ``stats().bytes <= capacity_bytes``.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._rejected = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        """The value for ``key`` (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: str, value: V) -> bool:
        """Store ``value`` under ``key``, evicting LRU entries to make room; False if it can never fit."""
        size = int(value.nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            if size > self._capacity:
                self._rejected += 1
                return False
            self._evict_until(self._capacity - size)
            self._entries[key] = value
            self._bytes += size
            return True

    def resize(self, capacity_bytes: int) -> None:
        """Change the bound, evicting LRU entries if the cache is now over it."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        with self._lock:
            self._capacity = capacity_bytes
            self._evict_until(capacity_bytes)

    def clear(self) -> None:
        """Drop every entry (e.g. when the model changes, since embeddings belong to one model)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _evict_until(self, limit: int) -> None:
        while self._entries and self._bytes > limit:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= int(evicted.nbytes)
            self._evictions += 1

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(capacity_bytes=self._capacity, bytes=self._bytes, entries=len(self._entries),
                              hits=self._hits, misses=self._misses, evictions=self._evictions,
                              rejected=self._rejected)
