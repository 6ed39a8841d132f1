"""Batched greedy decoding equals unbatched decoding, request by request, for every hf family."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.tiny import TINY_MODELS, family_of_tiny, pack_features
from vlmforge.families import get_family
from vlmforge.modeling.images import synthetic_images
from vlmforge.runner import batching, states
from vlmforge.runner.batching import GreedyBatch, greedy_batch

FAMILIES = TINY_MODELS
"""Every tiny model of every hf family, from the registry."""
PROMPTS = ["Question: which city is this? Answer:", "What?",
           "Describe the picture of two dogs playing in the snow near a tree, please.", None, "A photo of"]
LIMITS = [16, 5, 16, 9, 12]


@dataclasses.dataclass
class Tiny:
    family: Any
    llm: Any
    processor: Any
    features: list[torch.Tensor]  # five images' [1, N_i, H] (anyres: N_i depends on the image's size)
    prompts: list[str | None]

    def prefixes(self) -> list[Any]:
        return [self.family.llm_prefix(self.llm, self.processor, self.features[i], p)
                for i, p in enumerate(self.prompts)]

    def alone(self, limits: list[int]) -> list[Any]:
        return [self.family.generate(self.llm, self.processor, self.features[i], p, n)
                for i, (p, n) in enumerate(zip(self.prompts, limits))]


_made: dict[str, Tiny] = {}


@pytest.fixture
def tiny_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A tiny float32 model (``tiny://NAME``): its LLM alone, and five images' features from its visual module."""
    name = request.param
    if name not in _made:
        family = family_of_tiny(name)
        model_dir = tmp_path_factory.mktemp(name) / "model"
        family.make_tiny_source(f"tiny://{name}", model_dir, seed=0)
        model = family.load_model(model_dir, torch.float32)
        processor = family.load_processor(model_dir)
        images = synthetic_images() + [synthetic_images(80)[2].rotate(90), synthetic_images(50)[1]]
        with torch.no_grad():
            outputs = family.visual_outputs(family.visual_module(model), family.visual_inputs(processor, images))
            features = pack_features(family, processor, images, outputs, model, model_dir.parent / "extras")
        prompts = PROMPTS if family.takes_prompt else [None] * len(PROMPTS)
        _made[name] = Tiny(family, family.extract_llm(model), processor, features, prompts)
    return _made[name]


@pytest.mark.parametrize("tiny_family", FAMILIES, indirect=True)
def test_batched_greedy_equals_each_request_alone(tiny_family: Tiny) -> None:
    t = tiny_family
    prefixes = t.prefixes()
    if t.family.takes_prompt:
        assert len({p.length for p in prefixes}) > 2, "the prompts must need padding"
    batched = greedy_batch(t.llm, prefixes, LIMITS)
    for row, (alone, got) in enumerate(zip(t.alone(LIMITS), batched, strict=True)):
        assert got.tokens == alone.tokens, f"row {row}"
        assert got.logits.shape == alone.logits.shape
        assert (got.logits - alone.logits).abs().max().item() < 1e-4, f"row {row}"
    assert len({tuple(r.tokens) for r in batched}) > 1, "different images give different outputs"


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_the_padding_mask_matters(tiny_family: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: letting the left-padded rows attend to their padding changes their tokens (so the test above
    would catch a wrong mask or wrong positions)."""
    t = tiny_family
    stack = states._stack

    def unmasked(prefixes: Any, *, left: bool) -> Any:
        embeds, mask, padded = stack(prefixes, left=left)
        return embeds, torch.ones_like(mask), padded

    monkeypatch.setattr(states, "_stack", unmasked)
    batched = greedy_batch(t.llm, t.prefixes(), LIMITS)
    alone = t.alone(LIMITS)
    assert any(a.tokens != b.tokens for a, b in zip(alone, batched))


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-t5"], indirect=True)
def test_rows_end_on_their_own_eos_limit_or_cancel(tiny_family: Tiny) -> None:
    t = tiny_family
    alone = t.alone([16] * 5)
    prefixes = t.prefixes()
    # row 1 ends at its third token as if it were an end token; row 2 is cancelled after its first token
    prefixes[1] = dataclasses.replace(prefixes[1], eos=frozenset({alone[1].tokens[2]}))
    stop_at = alone[1].tokens.index(alone[1].tokens[2]) + 1
    batch = GreedyBatch(t.llm, prefixes, [16, 16, 16, 16, 4])
    seen: list[list[int]] = [[] for _ in prefixes]
    for step, events in enumerate(batch):
        for event in events:
            seen[event.row].append(event.token)
        if step == 0:
            batch.cancel(2, "cancelled")
    assert batch.finish == ["length", "stop", "cancelled", "length", "length"]
    assert seen[1] == alone[1].tokens[:stop_at]
    assert seen[2] == alone[2].tokens[:1]
    assert seen[4] == alone[4].tokens[:4]
    for row in (0, 3):
        assert seen[row] == alone[row].tokens
    assert [r.tokens for r in batch.results()] == seen


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_step_sync_sees_every_fed_token_and_the_end(tiny_family: Tiny) -> None:
    """What rank 0 sends the other ranks: the B tokens fed after each step, go_on False exactly once, last."""
    t = tiny_family

    class Recorder:
        def __init__(self) -> None:
            self.steps: list[tuple[list[int], bool]] = []

        def step(self, tokens: torch.Tensor, go_on: bool, changes: Any = None) -> None:
            assert changes is None or not changes.joined, "nothing joins this batch"
            self.steps.append((tokens.tolist(), go_on))

    recorder = Recorder()
    batch = GreedyBatch(t.llm, t.prefixes(), [3, 5, 2, 5, 1], sync=recorder, pad_token_id=1)
    for _ in batch:
        pass
    assert [go for _, go in recorder.steps] == [True] * 4 + [False]
    for step, (fed, _) in enumerate(recorder.steps):
        # a row is fed its own token while it goes on, the pad token once it has ended
        assert fed == [tokens[step] if step < len(tokens) - 1 else 1 for tokens in batch.tokens]

    class Replay:
        def __init__(self, steps: list[tuple[list[int], bool]]) -> None:
            self.steps = iter(steps)

        def step(self, size: int) -> tuple[torch.Tensor, bool, None]:
            tokens, go_on = next(self.steps)
            assert len(tokens) == size
            return torch.tensor(tokens), go_on, None

    assert batching.follow_batch(t.llm, t.prefixes(), Replay(recorder.steps)) == batch.steps


@pytest.mark.parametrize("name", FAMILIES)
def test_the_engine_batches_what_it_generates_alone(name: str, tiny_engine_of: Any) -> None:
    """The float16 engine (ONNX visual engine + LLM), five requests in one call (the visual engine takes
    four at a time), against one call per request: every tiny model of every family."""
    from vlmforge.runner.engine import HfEngine

    engine = HfEngine(tiny_engine_of(name))
    prompts = PROMPTS if engine.family.takes_prompt else [None] * len(PROMPTS)
    images = synthetic_images(64) + [synthetic_images(80)[2].rotate(90), synthetic_images(50)[1]]
    inputs = sum(engine.family.visual_inputs(engine.processor, images).inputs_per_image)  # anyres: 5 images' tiles
    if engine.config.visual.max_batch_size >= inputs:  # tiny-llava-next's visual batch holds 2 x 4 images' tiles,
        # tiny-gemma3's 4 x 2 images: the ONNX batch (tile) axis is dynamic: several visual calls here too
        engine.config.visual.max_batch_size = min(8, inputs - 1)
    assert engine.config.visual.max_batch_size < inputs
    alone = [engine.generate(image, prompt, n) for image, prompt, n in zip(images, prompts, LIMITS)]
    batched = engine.generate_batch(images, prompts, LIMITS, keep_logits=True)
    for a, b in zip(alone, batched, strict=True):
        steps = len(a.tokens)
        if a.tokens != b.tokens:
            # only where the lone decode meets a float16 near-tie (its two likeliest tokens within 0.01: tiny-gemma3's
            # random LLM has several on these inputs); up to and at that step the logits agree as below
            steps = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y) + 1
            top = a.logits[steps - 1].float().topk(2).values
            assert float(top[0] - top[1]) < 0.01, (a.tokens, b.tokens)
        else:
            assert a.text == b.text
        # float16 rounding of a differently shaped batch, relative to the logits' size (a few units in the last
        # place: 0.001 of 1.5 for LLaVA, 0.19 of 45 for BLIP-2 T5); in float32 they agree to 1e-4 (test above)
        scale = a.logits.abs().max().item()
        assert (a.logits[:steps] - b.logits[:steps]).abs().max().item() < 1e-2 * max(scale, 0.5)
    assert sum(a.tokens == b.tokens for a, b in zip(alone, batched, strict=True)) >= len(alone) - 1
    # the prompt-length check counts an image at the engine's largest count (size-dependent families: the largest
    # image's; a 64x64 image gives tiny-qwen2-vl 4 of 16 tokens, tiny-llava-onevision 46 of 54; tiny-pix2struct-vqa
    # renders a header above it: 55 of its 64 patches)
    features = engine.encode_images([images[0]])[0]
    spare = engine.config.num_visual_features - features[0, ..., 0].numel()
    assert spare >= 0 and (spare == 0 or engine.family.size_dependent_tokens or engine.renders_prompt)
    lengths = [engine.llm_prefix(features, p).length + spare for p in prompts]
    assert [engine.prompt_length(p) for p in prompts] == lengths


@pytest.mark.parametrize("tiny_family", FAMILIES, indirect=True)
def test_prompt_length_is_the_prefix_length(tiny_family: Tiny) -> None:
    t = tiny_family
    counts = [f[0, ..., 0].numel() for f in t.features]  # [1, N, hidden]; qwen2_vl's grids [1, h, w, hidden]
    assert [t.family.prompt_length(t.processor, p, counts[i]) for i, p in enumerate(t.prompts)] == [
        p.length for p in t.prefixes()]


def test_a_llava_prompt_with_two_images_is_refused_before_any_forward(tmp_path: Path) -> None:
    family = get_family("llava")
    family.make_tiny(tmp_path, seed=0)
    processor = family.load_processor(tmp_path)
    with pytest.raises(ValueError, match="exactly one <image>"):
        family.prompt_length(processor, "<image> and <image>", 16)


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_the_static_cache_path_equals_each_request_alone(tiny_family: Tiny) -> None:
    """The GPU fast path's cache layout, masks and bucket padding (5 requests in a bucket of 8), without
    torch.compile (CPU); each bucket's cache is reused by the next batch."""
    from vlmforge.runner.static import StaticDecoder

    t = tiny_family
    decoder = StaticDecoder(t.llm, max_batch_size=8, length_multiple=32, compile=False)
    alone = t.alone(LIMITS)
    for _ in range(2):
        batched = greedy_batch(t.llm, t.prefixes(), LIMITS, factory=decoder.batch)
        for row, (a, b) in enumerate(zip(alone, batched, strict=True)):
            assert b.tokens == a.tokens, f"row {row}"
            assert (a.logits - b.logits).abs().max().item() < 1e-4
    longest = max(p.length for p in t.prefixes())
    assert list(decoder._slots) == [(8, -(-(longest + max(LIMITS)) // 32) * 32)]
    one = greedy_batch(t.llm, t.prefixes()[3:4], [9], factory=decoder.batch)
    assert one[0].tokens == alone[3].tokens and len(decoder._slots) == 2


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_warming_up_with_autograd_on_keeps_no_activations_alive(tiny_family: Tiny) -> None:
    """Warm-up runs in whatever thread calls it, autograd on: the cache's in-place writes must not tie the prefill's
    activation graph to the bucket's cache for good (on an H100 that held about 52 GiB for LLaVA-7B's batch-16
    bucket, until the decode path ran without autograd)."""
    from vlmforge.runner.static import StaticDecoder

    decoder = StaticDecoder(tiny_family.llm, max_batch_size=4, length_multiple=32, compile=False)
    assert torch.is_grad_enabled()
    decoder.warmup([1, 4], 20, 8)
    batch = decoder.batch(tiny_family.prefixes()[:2], 4)
    batch.step(batch.prefill().argmax(-1))
    for slot in decoder._slots.values():
        for layer in slot.cache.layers:
            assert not layer.keys.requires_grad and layer.keys.grad_fn is None and layer.values.grad_fn is None


def test_static_buckets() -> None:
    from vlmforge.runner.static import bucket_batch, bucket_length

    assert [bucket_batch(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_batch(12, 12) == 12
    assert bucket_length(600, 256, 4096) == 768 and bucket_length(4000, 256, 4096) == 4096
    with pytest.raises(ValueError, match="exceed"):
        bucket_length(5000, 256, 4096)


class _Lockstep:
    """A StepSync that only records: with one, GreedyBatch feeds every step from the host (the TP leader's way)."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[int], bool]] = []

    def step(self, tokens: torch.Tensor, go_on: bool, changes: Any = None) -> None:
        self.sent.append((tokens.tolist(), go_on))


class _CountingFactory:
    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.steps = 0

    def __call__(self, prefixes: Any, max_new_tokens: int) -> Any:
        state = batching.make_batch(self.llm, prefixes)
        step = state.step

        def counted(tokens: torch.Tensor) -> torch.Tensor:
            self.steps += 1
            return step(tokens)

        state.step = counted
        return state


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_launching_the_next_step_ahead_changes_no_token(tiny_family: Tiny) -> None:
    """Without followers the next step is launched before the tokens are read (fed the device's argmax); with a
    StepSync every step is fed from the host. End tokens, token limits and a cancel end the same rows at the same
    tokens either way; the early launch costs at most one step when a batch ends on an end token or cancel."""
    t = tiny_family
    alone = t.alone([16] * 5)
    prefixes = t.prefixes()
    for row in (0, 1):  # these rows stop on an end token: the first token they had not made before position 3
        tokens = alone[row].tokens
        eos = next(tok for i, tok in enumerate(tokens) if i >= 3 and tok not in tokens[:i])
        prefixes[row] = dataclasses.replace(prefixes[row], eos=frozenset({eos}))
    limits = [16, 16, 16, 6, 16]

    def run(sync: Any) -> tuple[GreedyBatch, int]:
        factory = _CountingFactory(t.llm)
        batch = GreedyBatch(t.llm, prefixes, limits, sync=sync, factory=factory)
        for i, _ in enumerate(batch):
            if i == 4:
                batch.cancel(2, "cancelled")
            if i == 9:
                batch.cancel(4, "cancelled")
        return batch, factory.steps

    ahead, ahead_steps = run(None)
    lockstep, lockstep_steps = run(_Lockstep())
    assert ahead.tokens == lockstep.tokens and ahead.finish == lockstep.finish
    assert ahead.finish == ["stop", "stop", "cancelled", "length", "cancelled"]
    assert lockstep_steps <= ahead_steps <= lockstep_steps + 1
    for row in (0, 1, 3):
        assert ahead.tokens[row] == alone[row].tokens[:len(ahead.tokens[row])]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor compiles for the CPU with a C++ compiler (apt-get install g++; .ci/run does)")
@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_the_compiled_static_step_equals_each_request_alone(tiny_family: Tiny) -> None:
    """The bucket's decode step compiled by Inductor (on the CPU here; on a GPU it is also captured in a CUDA
    graph), the cache layers writing in place: each request's tokens are those it gets alone."""
    from vlmforge.runner.static import StaticDecoder

    t = tiny_family
    decoder = StaticDecoder(t.llm, max_batch_size=8, length_multiple=32, compile=True, mode="default")
    alone = t.alone(LIMITS)
    for _ in range(2):  # the second batch reuses the bucket's cache and compiled step
        batched = greedy_batch(t.llm, t.prefixes(), LIMITS, factory=decoder.batch)
        for row, (a, b) in enumerate(zip(alone, batched, strict=True)):
            assert b.tokens == a.tokens, f"row {row}"
            assert (a.logits - b.logits).abs().max().item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_the_graph_captured_static_step_equals_each_request_alone_on_a_gpu(tmp_path: Path) -> None:
    """On a GPU each bucket's compiled step is captured into a CUDA graph once and replayed: the tokens are still
    those each request gets alone (float32, so the GPU kernels do not flip near-ties)."""
    from vlmforge.runner.static import StaticDecoder

    family = get_family("llava")
    family.make_tiny(tmp_path / "model", seed=0)
    model = family.load_model(tmp_path / "model", torch.float32, device="cuda")
    processor = family.load_processor(tmp_path / "model")
    llm = family.extract_llm(model)
    with torch.no_grad():
        features = family.visual_module(model)(family.pixel_values(processor, synthetic_images()).to("cuda"))
    prefixes = [family.llm_prefix(llm, processor, features[i:i + 1], p) for i, p in enumerate(PROMPTS[:3])]
    alone = [family.generate(llm, processor, features[i:i + 1], p, 12) for i, p in enumerate(PROMPTS[:3])]
    decoder = StaticDecoder(llm, max_batch_size=4, length_multiple=32, mode="default")
    assert decoder.graphs
    for _ in range(2):
        batched = greedy_batch(llm, prefixes, 12, factory=decoder.batch)
        assert [b.tokens for b in batched] == [a.tokens for a in alone]
    assert all(slot.graph is not None for slot in decoder._slots.values())
