"""The engine protocol: one loader that dispatches by toolchain, and both engines giving everything their protocol
declares (the scheduler, the followers and the server use nothing else), for every registered family."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.runners import first_tie
from tests.helpers.tiny import TINY_MODELS
from vlmforge.errors import DeployError, ToolchainUnavailable
from vlmforge.runner.loader import LoadOptions, load_engine
from vlmforge.runner.protocol import Engine, EngineKind, IncrementalEngine, WholeRequestEngine


def members(protocol: type) -> set[str]:
    """The names a protocol declares (methods, properties, attributes), its bases' included."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def same_parameters(declared: Any, actual: Any, *, bound: bool) -> bool:
    """The implementation takes the declared parameters by name, in order; any more have defaults."""
    want = list(inspect.signature(declared).parameters)[1:]
    have = list(inspect.signature(actual).parameters.values())[0 if bound else 1:]
    return [p.name for p in have[:len(want)]] == want and all(
        p.default is not inspect.Parameter.empty for p in have[len(want):])


class Recorder:
    """Rank 0's side of the control channel: the tokens fed after each step."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[int], bool]] = []

    def step(self, tokens: Any, go_on: bool, changes: Any = None) -> None:
        self.steps.append((tokens.tolist(), go_on))


class Replay:
    """A following rank's side: rank 0's recorded steps."""

    def __init__(self, steps: list[tuple[list[int], bool]]) -> None:
        self.steps = iter(steps)

    def step(self, size: int) -> tuple[Any, bool, None]:
        import torch

        tokens, go_on = next(self.steps)
        assert len(tokens) == size
        return torch.tensor(tokens), go_on, None


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_family_serves_through_the_incremental_protocol(name: str, tiny_engine_of: Any) -> None:
    """Every tiny model of every registered family: the loader gives an incremental engine with everything the
    protocol declares, and the one encode -> prefix -> batch sequence (vlmforge.runner.jobs) gives rank 0 the
    tokens of each request alone, and a following rank, fed rank 0's tokens, the same steps."""
    from vlmforge.modeling.images import synthetic_images
    from vlmforge.runner.jobs import encode_job, follow_job, lead_batch

    engine = load_engine(tiny_engine_of(name))
    assert engine.kind is EngineKind.INCREMENTAL
    missing = [member for member in members(IncrementalEngine) if not hasattr(engine, member)]
    assert not missing, missing
    for member in members(IncrementalEngine):
        declared = getattr(IncrementalEngine, member, None)
        if inspect.isfunction(declared):
            assert same_parameters(declared, getattr(engine, member), bound=True), member
    assert engine.limits.max_batch_size == engine.config.max_batch_size
    assert engine.decode_path == "dynamic"
    engine.warmup([1, 2], 20, 4)  # nothing to compile on the dynamic path

    images = synthetic_images(64)
    prompts = ["What is this?", None, "Describe the picture, please."] if engine.family.takes_prompt else [None] * 3
    limits = [6, 3, 8]
    job = encode_job(engine, images, prompts, limits)
    assert [f.shape[0] for f in job.features] == [1, 1, 1] and job.vision_ms > 0
    recorder = Recorder()
    batch = lead_batch(engine, job, sync=recorder)
    for _ in batch:
        pass
    alone = [engine.generate(image, prompt, n) for image, prompt, n in zip(images, prompts, limits)]
    for index, (got, lone) in enumerate(zip(batch.results(), alone, strict=True)):
        # float16 tiny models: a lone near-tie may round the other way in a batch's shapes (a new machine's CPU
        # flipped one of tiny-llava-next's); equal up to the first tied step then, exact otherwise
        tied = first_tie(lone)
        assert got.tokens[:tied] == lone.tokens[:tied], (index, got.tokens, lone.tokens)
    assert recorder.steps and [go for _, go in recorder.steps][-1] is False
    assert follow_job(engine, job.to_host(), Replay(recorder.steps)) == batch.steps


def test_the_tensorrt_engine_class_is_a_whole_request_engine() -> None:
    from vlmforge.runner.trtllm import TrtllmEngine

    assert TrtllmEngine.kind is EngineKind.WHOLE_REQUEST
    set_in_init = {"config", "family", "tokenizer"}  # TensorRT-LLM cannot be constructed here
    source = inspect.getsource(TrtllmEngine.__init__)
    assert all(f"self.{name} =" in source for name in set_in_init)
    for name in members(WholeRequestEngine) - set_in_init:
        assert hasattr(TrtllmEngine, name), name
        declared = getattr(WholeRequestEngine, name, None)
        if inspect.isfunction(declared):
            assert same_parameters(declared, getattr(TrtllmEngine, name), bound=False), name
    assert members(Engine) < members(WholeRequestEngine)


@pytest.fixture
def trtllm_engine_dir(tiny_engine: Path, tmp_path: Path) -> Path:
    config = json.loads((tiny_engine / "engine.json").read_text())
    config.update(toolchain="trtllm", world_size=2, tp=2, compute_capability="9.0", tensorrt_llm_version="1.2.1")
    (tmp_path / "engine.json").write_text(json.dumps(config))
    return tmp_path


def test_the_loader_sends_a_tensorrt_engine_to_tensorrt_llm_and_checks_its_ranks(trtllm_engine_dir: Path) -> None:
    with pytest.raises(DeployError, match="for 2 rank.*mpirun -n 2, not 1"):
        load_engine(trtllm_engine_dir)
    with pytest.raises(DeployError, match="exceeds the TensorRT engine's max_batch_size"):
        load_engine(trtllm_engine_dir, LoadOptions(world_size=2, max_batch_size=64))
    with pytest.raises(ToolchainUnavailable, match="serving it needs TensorRT-LLM and a GPU"):
        load_engine(trtllm_engine_dir, LoadOptions(world_size=2))


def test_the_runner_probes_no_engine_attributes() -> None:
    """Everything the runner asks of an engine is in the protocol: no getattr/hasattr on engines."""
    root = Path(__file__).resolve().parents[2] / "vlmforge" / "runner"
    for path in root.glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("getattr(" in line or "hasattr(" in line) and "engine" in line.lower():
                pytest.fail(f"{path.name}:{number} probes an engine: {line.strip()}")


def _fake(kind: EngineKind) -> Any:
    return type("Fake", (), {"kind": kind})()


def test_followers_refuse_a_job_for_the_other_kind_of_engine() -> None:
    from vlmforge.runner.distributed import ControlChannel, RankInfo, Shutdown, WholeJob, run_follower

    class Inbox(ControlChannel):
        def __init__(self, messages: list[Any]) -> None:
            super().__init__(RankInfo(1, 2))
            self.messages = messages

        def receive(self) -> Any:
            return self.messages.pop(0)

    with pytest.raises(DeployError, match="whole-request job to a incremental engine"):
        run_follower(_fake(EngineKind.INCREMENTAL), Inbox([WholeJob([], [], []), Shutdown()]))


def test_a_shared_image_is_encoded_once_per_batch() -> None:
    """A request's ``n`` choices are n scheduler requests holding the same image object: the batch's visual-engine
    call gets it once per count of images in its prompt (LLaVA-OneVision preprocesses an image among several
    otherwise than alone), and every request sharing it gets those features (with several images per prompt too)."""
    from vlmforge.runner.jobs import encode_job

    class Counting:
        renders_prompt = False

        def __init__(self) -> None:
            self.calls: list[tuple[list[Any], list[int]]] = []

        def encode_images(self, images: list[Any], prompts: list[Any] | None = None, *,
                          images_in_prompt: list[int]) -> list[Any]:
            assert prompts is None  # renders no prompt
            self.calls.append((list(images), list(images_in_prompt)))
            return [f"features of {image} among {n}" for image, n in zip(images, images_in_prompt, strict=True)]

    engine = Counting()
    cat, dog = "cat", "dog"  # any objects: identity is what counts
    job = encode_job(engine, [cat, cat, cat, [dog, cat], "cat", [cat, dog]], ["a"] * 6,  # type: ignore[arg-type]
                     [4] * 6)
    assert engine.calls == [([cat, dog, cat], [1, 2, 2])]
    assert job.features == (["features of cat among 1"] * 3 + [["features of dog among 2", "features of cat among 2"],
                            "features of cat among 1", ["features of cat among 2", "features of dog among 2"]])


def test_an_image_rendered_with_its_prompt_is_encoded_once_per_prompt() -> None:
    """An engine whose checkpoint renders the prompt into the image (Pix2Struct VQA) gets each image with its
    request's prompt: the same image asked two questions is encoded twice, asked the same one once."""
    from vlmforge.runner.jobs import encode_job

    class Rendering:
        renders_prompt = True

        def __init__(self) -> None:
            self.calls: list[tuple[list[Any], list[Any]]] = []

        def encode_images(self, images: list[Any], prompts: list[Any] | None = None, *,
                          images_in_prompt: list[int] | None = None) -> list[Any]:
            assert prompts is not None
            self.calls.append((list(images), list(prompts)))
            return [f"{image} under {prompt}" for image, prompt in zip(images, prompts)]

    engine = Rendering()
    cat = "cat"
    job = encode_job(engine, [cat, cat, cat, "dog"], ["a", "b", "a", None], [4] * 4)  # type: ignore[arg-type]
    assert engine.calls == [([cat, cat, "dog"], ["a", "b", None])]
    assert job.features == ["cat under a", "cat under b", "cat under a", "dog under None"]
