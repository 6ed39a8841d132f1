"""The image-embedding cache: keys, LRU by bytes, and an hf engine whose hits decode exactly like misses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vlmforge.runner.image_cache import ImageCache, tensor_bytes


def _noise(seed: int, size: int = 64) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_the_key_is_the_encoder_input_its_dtype_shape_and_the_namespace() -> None:
    cache = ImageCache(1024, namespace="engine-a")
    pixels = torch.rand(3, 8, 8)
    changed = pixels.clone()
    changed[1, 4, 4] = torch.nextafter(changed[1, 4, 4], torch.tensor(2.0))  # one value, one ulp
    assert cache.key(pixels) == cache.key(pixels.clone())
    assert cache.key(pixels) != cache.key(changed)
    assert cache.key(pixels) != cache.key(pixels.reshape(3, 4, 16))
    assert cache.key(pixels) != cache.key(pixels.double())
    assert cache.key(pixels) != ImageCache(1024, namespace="engine-b").key(pixels)


def test_entries_are_evicted_least_recently_used_first_by_bytes() -> None:
    entry = torch.zeros(1, 4, 8)  # 128 bytes
    cache = ImageCache(3 * tensor_bytes(entry), namespace="n")
    for name in "abc":
        cache.put(name, entry + ord(name))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", entry)
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (3, 3 * tensor_bytes(entry), 1)
    cache.put("big", torch.zeros(1, 4, 8 * 4))  # larger than the whole cache: not kept, nothing evicted for it
    assert cache.get("big") is None and cache.stats().evictions == 1 and cache.stats().bytes == 3 * tensor_bytes(entry)
    cache.put("e", torch.zeros(1, 4, 16))  # two entries' worth: the two least recent go
    assert cache.stats().evictions == 3 and cache.stats().bytes <= cache.max_bytes


def test_a_stored_entry_is_a_private_copy() -> None:
    cache = ImageCache(1 << 20, namespace="n")
    features = torch.ones(1, 2, 2)
    cache.put("k", features)
    features.add_(1)
    assert torch.equal(cache.get("k"), torch.ones(1, 2, 2))


def test_encode_runs_only_the_distinct_misses_once() -> None:
    cache = ImageCache(1 << 20, namespace="n")
    calls: list[list[int]] = []

    def encode(indices: list[int]) -> list[torch.Tensor]:
        calls.append(indices)
        return [torch.full((1, 2, 2), float(pixels[i].sum())) for i in indices]

    pixels = [torch.full((3, 2, 2), float(v)) for v in (1, 2, 1, 3)]
    first = cache.encode(pixels, encode)
    assert calls == [[0, 1, 3]] and torch.equal(first[2], first[0])
    second = cache.encode(pixels[1:3], encode)
    assert calls == [[0, 1, 3]] and torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (3, 3)


@pytest.fixture(scope="module")
def engines(tiny_engine: Path) -> tuple[Any, Any]:
    from vlmforge.runner.engine import HfEngine

    return HfEngine(tiny_engine), HfEngine(tiny_engine, image_cache_bytes=64 << 20)


def _same(a: list[Any], b: list[Any]) -> None:
    assert [g.tokens for g in a] == [g.tokens for g in b]
    for x, y in zip(a, b):
        assert torch.equal(x.logits, y.logits)


def test_a_hit_decodes_bit_for_bit_like_a_miss_and_like_no_cache(engines: tuple[Any, Any]) -> None:
    plain, cached = engines
    images = [_noise(1), _noise(2)]
    prompts = ["What is this?", "Describe it."]
    reference = plain.generate_batch(images, prompts, 8, keep_logits=True)
    before = cached.image_cache.stats()
    missed = cached.generate_batch(images, prompts, 8, keep_logits=True)
    hit = cached.generate_batch(images, prompts, 8, keep_logits=True)
    stats = cached.image_cache.stats()
    assert (stats.misses - before.misses, stats.hits - before.hits) == (2, 2)
    _same(reference, missed)
    _same(reference, hit)
    # a batch mixing a hit with a miss, and the features themselves
    mixed = cached.generate_batch([images[1], _noise(3)], prompts, 8, keep_logits=True)
    _same(plain.generate_batch([images[1], _noise(3)], prompts, 8, keep_logits=True), mixed)
    for fresh, stored in zip(plain.encode_images(images), cached.encode_images(images)):
        assert torch.equal(fresh, stored)


def test_a_changed_image_misses(engines: tuple[Any, Any]) -> None:
    _, cached = engines
    image = _noise(4)
    cached.encode_images([image])
    changed = image.copy()
    r, g, b = changed.getpixel((10, 10))
    changed.putpixel((10, 10), ((r + 1) % 256, g, b))
    before = cached.image_cache.stats()
    cached.encode_images([changed])
    cached.encode_images([image])
    after = cached.image_cache.stats()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)


def test_the_engine_cache_stays_within_its_bytes(tiny_engine: Path) -> None:
    from vlmforge.runner.engine import HfEngine

    probe = HfEngine(tiny_engine, image_cache_bytes=1 << 30)
    one = tensor_bytes(probe.encode_images([_noise(10)])[0])
    small = HfEngine(tiny_engine, image_cache_bytes=2 * one)
    small.encode_images([_noise(10), _noise(11), _noise(12)])
    stats = small.image_cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 2 * one, 1)
    small.encode_images([_noise(10)])  # evicted first (least recently used): a miss again
    assert small.image_cache.stats().misses == 4


def test_no_cache_without_a_size_or_without_the_visual_engine(tiny_engine: Path) -> None:
    from vlmforge.runner.engine import HfEngine

    assert HfEngine(tiny_engine).image_cache is None
    assert HfEngine(tiny_engine, load_vision=False, image_cache_bytes=1 << 20).image_cache is None
