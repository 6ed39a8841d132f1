"""The image-embedding cache on an hf engine: encode_images for a batch of distinct images without a cache, with
the cache on first sight (misses: the visual engine plus the keys and the stores) and again (hits), in one run;
and the key's cost for a LLaVA-1.5-sized input (3 x 336 x 336 float32).

    python bench/image_cache.py ENGINE_DIR [--images 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _noise(seed: int, size: int) -> object:
    import torch
    from PIL import Image

    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import torch

    from vlmforge.runner.engine import HfEngine
    from vlmforge.runner.image_cache import ImageCache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=336, help="side of the test images in pixels")
    args = parser.parse_args()

    plain = HfEngine(args.engine_dir)
    cached = HfEngine(args.engine_dir, image_cache_bytes=1 << 30)
    assert cached.image_cache is not None
    images = [_noise(i, args.size) for i in range(args.images)]
    plain.encode_images(images)  # warm both sessions
    cached.encode_images([_noise(10_000, args.size)])
    no_cache = _ms(lambda: plain.encode_images(images), args.repeats)
    misses = []
    for round_ in range(args.repeats):  # fresh images each round: every one a miss
        fresh = [_noise(1000 * (round_ + 1) + i, args.size) for i in range(args.images)]
        start = time.perf_counter()
        cached.encode_images(fresh)
        misses.append((time.perf_counter() - start) * 1000)
    cached.encode_images(images)
    hits = _ms(lambda: cached.encode_images(images), args.repeats)
    pixels_only = _ms(lambda: cached._pixels(images), args.repeats)
    key = ImageCache(1, "bench").key
    llava_input = torch.rand(3, 336, 336)
    key_ms = _ms(lambda: key(llava_input), 20)
    stats = cached.image_cache.stats()
    print(f"engine {args.engine_dir} ({cached.config.family}), {args.images} images of {args.size}x{args.size}, "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"  encode_images without a cache:   {no_cache:8.2f} ms")
    print(f"  with the cache, all misses:      {statistics.median(misses):8.2f} ms")
    print(f"  with the cache, all hits:        {hits:8.2f} ms  (of which preprocessing {pixels_only:.2f} ms)")
    print(f"  key of a 3x336x336 float32 input: {key_ms:7.3f} ms")
    print(f"  cache: {stats.entries} entries, {stats.bytes / 2**20:.1f} MiB, {stats.hits} hits, {stats.misses} misses")


if __name__ == "__main__":
    main()
