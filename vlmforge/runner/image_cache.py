"""The image-embedding cache: an image the runner has encoded before skips the visual engine.

What the key hashes, and why: the SHA-256 of the visual engine's exact input, the preprocessed pixel tensor
(dtype, shape and bytes), after a namespace naming the visual engine and its processor. Hashing the bytes a
client sent would miss the same picture sent re-encoded, and hashing the decoded image would have to list every
property the processor reads (mode, palette, transparency, size); the processed tensor is what the encoder
computes from, so two requests share an entry exactly when the encoder would be given the same input (up to a
SHA-256 collision). A checkpoint that renders the request's text into its image (Pix2Struct VQA) adds that text
as the entry's tag: the same image asked another question is another entry, the same question hits. Resizing and normalising still run for every image (milliseconds on the CPU); the encoder
forward is what a hit skips.

Where entries live: on the CPU. The hf engine's visual engine (ONNX Runtime) hands its outputs back in host
memory anyway, so a host entry costs no copy on a miss and the same host-to-device copy as a miss on a hit, and
takes no GPU memory from the KV cache.

Bounded in bytes: least recently used entries go first once the entries' bytes pass the limit; an entry larger
than the whole limit is not kept. Thread-safe (one lock around the table; encoding runs outside it, so two
threads encoding the same new image at once both encode it, and the later store replaces the earlier).

Tensor parallelism: only rank 0 runs the visual engine; it sends every batch's features to the other ranks
(:mod:`vlmforge.runner.distributed`), which never encode. A hit hands rank 0 the bits it stored on the miss, so
the followers receive the same tensors either way and no rank's decision can differ from another's.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIB = 1024 * 1024
DEFAULT_IMAGE_CACHE_MIB = 512
"""About 50 LLaVA-1.5 images (576 x 4096 float32 features, 9 MiB each); host memory, rank 0 only."""


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made, and what it holds now."""

    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    capacity_bytes: int


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ImageCache:
    """Visual features by the SHA-256 of the encoder's input, LRU-bounded by bytes (see the module docstring)."""

    def __init__(self, max_bytes: int, namespace: str) -> None:
        if max_bytes < 1:
            raise ValueError(f"an image cache needs a positive size in bytes, got {max_bytes} (0 means no cache: "
                             "make none)")
        self.max_bytes = max_bytes
        self._namespace = hashlib.sha256(namespace.encode()).digest()
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def key(self, pixels: torch.Tensor, tag: bytes = b"") -> str:
        """The key of one image's encoder input (any device; its dtype and shape are part of it) and ``tag`` (what
        else the input was made from: a rendered header's text; hashed with its length, so no two tags collide)."""
        import torch

        host = pixels.detach().to("cpu").contiguous()
        digest = hashlib.sha256(self._namespace)
        digest.update(f"{host.dtype}|{tuple(host.shape)}|{len(tag)}|".encode() + tag)
        digest.update(host.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
        return digest.hexdigest()

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._bytes, len(self._entries),
                              self.max_bytes)

    def get(self, key: str) -> torch.Tensor | None:
        """The stored features (counted as a hit and made most recent), or None (counted as a miss)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return found

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep a private CPU copy of ``features`` under ``key``, evicting the least recently used beyond the limit."""
        size = tensor_bytes(features)
        if size > self.max_bytes:
            return
        stored = features.detach().to("cpu", copy=True)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            self._entries[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)
                self._evictions += 1

    def encode(self, pixels: Sequence[torch.Tensor], encode: Callable[[list[int]], Sequence[torch.Tensor]],
               tags: Sequence[bytes] | None = None) -> list[torch.Tensor]:
        """Each image's features, in order: stored ones from the cache, the rest from ``encode(indices)`` (called
        once, with the indices of the distinct images that missed; it returns their features in that order), which
        are then stored. An image repeated within the call is encoded once and counts as a hit after its first.
        ``tags``: one per image, part of its key (:meth:`key`)."""
        if tags is not None and len(tags) != len(pixels):
            raise ValueError(f"{len(tags)} tags for {len(pixels)} images")
        keys = [self.key(p, tags[i] if tags is not None else b"") for i, p in enumerate(pixels)]
        out: list[torch.Tensor | None] = [None] * len(keys)
        first_of: dict[str, int] = {}
        missing: list[int] = []
        for index, key in enumerate(keys):
            if key in first_of:
                with self._lock:
                    self._hits += 1
                continue
            found = self.get(key)
            if found is None:
                first_of[key] = index
                missing.append(index)
            else:
                out[index] = found
        if missing:
            fresh = list(encode(missing))
            if len(fresh) != len(missing):
                raise ValueError(f"the encoder gave {len(fresh)} feature tensors for {len(missing)} images")
            for index, features in zip(missing, fresh):
                out[index] = features
                self.put(keys[index], features)
        for index, key in enumerate(keys):
            if out[index] is None:
                out[index] = out[first_of[key]]
        return out  # type: ignore[return-value]  # every slot is filled above
