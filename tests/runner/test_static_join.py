"""In-flight joins on the static decode path (StaticBatch.room/join/join_many/retire), on a tiny float32 LLaMA.

The batch is driven directly with teacher forcing (every row fed tokens fixed in advance, not its own picks), so the
logits of every step can be compared: a joiner's against the same prefix decoded alone through the eager
DecoderOnlyBatch, the running rows' against the same batch run without the join.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch

from vlmforge.modeling.generation import LlmPrefix
from vlmforge.runner.batching import DecoderOnlyBatch
from vlmforge.runner.static import StaticBatch, StaticDecoder

VOCAB = 96
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llm() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def prefix(llm: Any, length: int, seed: int) -> LlmPrefix:
    ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    device = llm.get_input_embeddings().weight.device
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids.to(device))
    return LlmPrefix("decoder", embeds, torch.ones((1, length), dtype=torch.long, device=device), frozenset())


def forced(seed: int, steps: int) -> list[int]:
    """The tokens a row is fed, fixed in advance (teacher forcing)."""
    return torch.randint(3, VOCAB, (steps,), generator=torch.Generator().manual_seed(1000 + seed)).tolist()


def alone(llm: Any, p: LlmPrefix, tokens: list[int]) -> list[torch.Tensor]:
    """The eager reference: the prefix alone in a DecoderOnlyBatch, fed ``tokens``; the logits before each."""
    with torch.no_grad():
        state = DecoderOnlyBatch(llm, [p])
        out = [state.prefill()[0]]
        out += [state.step(torch.tensor([t], device=p.embeds.device))[0] for t in tokens]
    return out


def run(decoder: StaticDecoder, llm: Any, *, join: bool, steps: int = 10, join_at: int = 4,
        together: bool = False) -> dict[str, Any]:
    """A batch of A (row 0) and B (row 1) in a bucket of 4 rows x 64 positions. With ``join``: after ``join_at``
    steps A retires and C joins its row, and D is appended into dummy row 2 (``together``: both in one join_many, one
    batched prefill of their two lengths); every row then steps on."""
    a, b, c, d = prefix(llm, 12, 0), prefix(llm, 9, 1), prefix(llm, 7, 2), prefix(llm, 12, 3)
    feeds = {name: forced(i, steps) for i, name in enumerate("ABCD")}
    batch = StaticBatch(decoder, decoder._slot(4, 64), [a, b])
    first = batch.prefill()
    logits: dict[str, list[torch.Tensor]] = {"A": [first[0]], "B": [first[1]], "C": [], "D": []}
    rows = {0: "A", 1: "B"}
    for t in range(steps):
        if join and t == join_at:
            assert batch.room(c.length, steps) == batch.size == 2  # no retired row yet: the first dummy row
            batch.retire(0)
            assert batch.room(c.length, steps) == 0
            if together:
                assert batch.room(d.length, steps, claimed=1) == 2
                first_c, first_d = batch.join_many([(0, c), (2, d)])
                logits["C"].append(first_c)
                logits["D"].append(first_d)
            else:
                logits["C"].append(batch.join(0, c))
                assert batch.room(d.length, steps) == 2
                logits["D"].append(batch.join(2, d))
            assert batch.size == 3
            rows = {0: "C", 1: "B", 2: "D"}
        fed = {name: feeds[name][len(logits[name]) - 1] for name in rows.values()}
        out = batch.step(torch.tensor([fed[rows[r]] for r in range(batch.size)], device=first.device))
        assert out.shape == (batch.size, VOCAB)
        for r, name in rows.items():
            logits[name].append(out[r])
    return {"logits": logits, "feeds": feeds, "prefixes": dict(zip("ABCD", (a, b, c, d))), "batch": batch}


def check_joins(decoder: StaticDecoder, llm: Any, tol: dict[str, float] = TOL, together: bool = False) -> None:
    plain = run(decoder, llm, join=False)
    joined = run(decoder, llm, join=True, together=together)
    # the running row is untouched by the join
    assert len(joined["logits"]["B"]) == len(plain["logits"]["B"]) == 11
    for t, (x, y) in enumerate(zip(plain["logits"]["B"], joined["logits"]["B"], strict=True)):
        assert torch.allclose(x, y, **tol), f"row B, step {t}"
    # A, until it retired, too
    for t, x in enumerate(joined["logits"]["A"]):
        assert torch.allclose(x, plain["logits"]["A"][t], **tol), f"row A, step {t}"
    # each joiner decodes exactly as it does alone
    for name in "CD":
        got = joined["logits"][name]
        assert len(got) == 7  # join's logits, then six steps
        ref = alone(llm, joined["prefixes"][name], joined["feeds"][name][:len(got) - 1])
        for t, (x, y) in enumerate(zip(ref, got, strict=True)):
            assert torch.allclose(x, y, **tol), f"joiner {name}, step {t}: {(x - y).abs().max().item()}"


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_joiners_decode_as_alone_and_running_rows_are_untouched(llm: Any, together: bool) -> None:
    decoder = StaticDecoder(llm, max_batch_size=4, length_multiple=32, compile=False, graphs=False)
    check_joins(decoder, llm, together=together)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor compiles for the CPU with a C++ compiler (apt-get install g++; .ci/run does)")
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_joins_into_the_compiled_step(llm: Any, together: bool) -> None:
    """The compiled step reads the cache buffers the join wrote in place (on a GPU also from a CUDA graph)."""
    decoder = StaticDecoder(llm, max_batch_size=4, length_multiple=32, compile=True, mode="default", graphs=False)
    check_joins(decoder, llm, together=together)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_joins_into_the_graph_captured_step_on_a_gpu(llm: Any, together: bool) -> None:
    """The captured CUDA graph replays over the buffers the join wrote in place (float32; kernels of other shapes
    than the lone eager run's: a slightly looser tolerance)."""
    gpu = llm.to("cuda")
    try:
        decoder = StaticDecoder(gpu, max_batch_size=4, length_multiple=32, compile=True, mode="default")
        assert decoder.graphs
        check_joins(decoder, gpu, dict(rtol=1e-4, atol=1e-4), together=together)
        assert all(slot.graph is not None for slot in decoder._slots.values())
    finally:
        llm.to("cpu")


def test_room_refuses_what_does_not_fit(llm: Any) -> None:
    decoder = StaticDecoder(llm, max_batch_size=4, length_multiple=32, compile=False, graphs=False)
    batch = StaticBatch(decoder, decoder._slot(2, 32), [prefix(llm, 10, 0), prefix(llm, 6, 1)])
    assert batch.room(4, 4) is None  # before the prefill
    with pytest.raises(RuntimeError, match="not been prefilled"):
        batch.join(0, prefix(llm, 4, 2))
    batch.prefill()
    assert batch.room(4, 4) is None  # both rows live, no dummy row
    batch.retire(1)
    batch.retire(0)
    assert batch.room(4, 4) == 0  # the lowest retired row first
    assert batch.room(10, 22) == 0  # written 10 + 22 = the bucket's 32 columns
    assert batch.room(10, 23) is None  # the answer would run past the bucket
    assert batch.room(11, 4) is None  # longer than the columns left of `written`
    with pytest.raises(ValueError, match="does not fit left of column 10"):
        batch.join(0, prefix(llm, 11, 2))
    with pytest.raises(ValueError, match="row 2 is not free"):
        batch.join(2, prefix(llm, 4, 2))
    with pytest.raises(ValueError, match="not in this batch"):
        batch.retire(2)
    batch.step(torch.tensor([5, 6]))
    assert batch.room(11, 4) == 0  # one step later it fits
    batch.join(0, prefix(llm, 11, 2))
    assert batch.room(11, 4) == 1
    with pytest.raises(ValueError, match="row 0 is not free"):
        batch.join(0, prefix(llm, 4, 2))
    assert batch.room(4, 4, claimed=1) is None, "one free row (1), no dummy row, no larger bucket: no second joiner"
    with pytest.raises(ValueError, match="row 1 is not free"):  # checked before any forward
        batch.join_many([(1, prefix(llm, 4, 2)), (1, prefix(llm, 5, 3))])
    assert batch.retired == {1} and batch.size == 2


def test_sliding_window_layers_refuse_joins() -> None:
    """A sliding-window layer's rolling buffer is shared by all rows' columns: room() says no."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    llm = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256, sliding_window=16)).eval()
    decoder = StaticDecoder(llm, max_batch_size=4, length_multiple=32, compile=False, graphs=False)
    batch = StaticBatch(decoder, decoder._slot(4, 32), [prefix(llm, 10, 0)])
    batch.prefill()
    assert batch.room(4, 4) is None
    assert "not in-place static layers" in (batch.join_refusal() or "")
    with pytest.raises(RuntimeError, match="StaticSlidingWindowLayer"):
        batch.join(1, prefix(llm, 4, 2))


def check_growth(decoder: StaticDecoder, llm: Any, tol: dict[str, float] = TOL, steps: int = 8,
                 together: bool = False) -> None:
    """A alone in a bucket of one row; after 3 steps C joins: the batch moves into the (already made) bucket of two
    rows (``together``: C and D join at once, 2 + 1 rows: into the bucket of four). A's logits equal those of A alone
    in the first bucket; the joiners' those of each alone through the eager path."""
    a, c, d = prefix(llm, 12, 0), prefix(llm, 7, 2), prefix(llm, 10, 3)
    feeds = {"A": forced(0, steps), "C": forced(2, steps), "D": forced(3, steps)}
    decoder._slot(2, 64)
    decoder._slot(4, 64)

    def drive(join: bool) -> dict[str, list[torch.Tensor]]:
        batch = StaticBatch(decoder, decoder._slot(1, 64), [a])
        logits: dict[str, list[torch.Tensor]] = {"A": [batch.prefill()[0]], "C": [], "D": []}
        names = ["A"]
        for t in range(steps):
            if join and t == 3 and not together:
                assert batch.room(c.length, steps) == 1  # a new row: the larger bucket exists
                logits["C"].append(batch.join(1, c))
                assert batch.slot.batch == 2 and batch.size == 2
                names = ["A", "C"]
            if join and t == 3 and together:
                assert [batch.room(c.length, steps), batch.room(d.length, steps, claimed=1)] == [1, 2]
                for name, first in zip("CD", batch.join_many([(1, c), (2, d)]), strict=True):
                    logits[name].append(first)
                assert batch.slot.batch == 4 and batch.size == 3
                names = ["A", "C", "D"]
            out = batch.step(torch.tensor([feeds[n][len(logits[n]) - 1] for n in names], device=a.embeds.device))
            for row, name in enumerate(names):
                logits[name].append(out[row])
        return logits

    plain, joined = drive(False), drive(True)
    for t, (x, y) in enumerate(zip(plain["A"], joined["A"], strict=True)):
        assert torch.allclose(x, y, **tol), f"row A, step {t}: {(x - y).abs().max().item()}"
    for name in "CD" if together else "C":
        ref = alone(llm, {"C": c, "D": d}[name], feeds[name][:len(joined[name]) - 1])
        assert len(ref) == len(joined[name]) == steps - 2
        for t, (x, y) in enumerate(zip(ref, joined[name], strict=True)):
            assert torch.allclose(x, y, **tol), f"joiner {name}, step {t}: {(x - y).abs().max().item()}"


@pytest.mark.parametrize("together", [False, True], ids=["one", "two-at-once"])
def test_a_full_bucket_grows_into_a_larger_one(llm: Any, together: bool) -> None:
    check_growth(StaticDecoder(llm, max_batch_size=4, length_multiple=32, compile=False, graphs=False), llm,
                 together=together)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("together", [False, True], ids=["one", "two-at-once"])
def test_a_full_bucket_grows_into_a_larger_one_on_a_gpu(llm: Any, together: bool) -> None:
    """The larger bucket's captured graph replays over the buffers the move wrote in place."""
    gpu = llm.to("cuda")
    try:
        decoder = StaticDecoder(gpu, max_batch_size=4, length_multiple=32, compile=True, mode="default")
        check_growth(decoder, gpu, dict(rtol=1e-4, atol=1e-4), together=together)
    finally:
        llm.to("cpu")


@pytest.mark.parametrize("graphs", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)"))], ids=["eager", "cuda-graph"])
def test_a_batch_smaller_than_its_bucket_prefills_only_its_requests(llm: Any, graphs: bool) -> None:
    """A new batch of 2 requests in a bucket of 4 rows (its buffers made by an earlier batch, as serve's warm-up makes
    them) runs its prefill forward over 2 rows, not 4 (the dummy rows were copies of the first request, prefilled
    too: a full bucket's prefill for every new batch); each request then decodes as it does alone, and a joiner
    appended into a dummy row does too."""
    model = llm.to("cuda") if graphs else llm
    try:
        decoder = StaticDecoder(model, max_batch_size=4, length_multiple=32, compile=graphs, mode="default",
                                graphs=graphs)
        a, b, c = prefix(model, 12, 0), prefix(model, 9, 1), prefix(model, 7, 2)
        slot = decoder._slot(4, 64)
        full = StaticBatch(decoder, slot, [c] * 4)  # the bucket's first batch allocates its buffers
        full.step(full.prefill().argmax(-1))
        rows_seen: list[int] = []
        hook = model.model.register_forward_pre_hook(
            lambda _, args, kwargs: rows_seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
        try:
            batch = StaticBatch(decoder, slot, [a, b])
            first = batch.prefill()
        finally:
            hook.remove()
        assert rows_seen == [2]
        tol = dict(rtol=1e-4, atol=1e-4) if graphs else TOL
        feeds = {name: forced(i, 6) for i, name in enumerate("AB")}
        got: dict[str, list[torch.Tensor]] = {"A": [first[0]], "B": [first[1]], "C": []}
        for t in range(6):
            if t == 2:
                assert batch.room(c.length, 6) == 2  # the first dummy row
                got["C"].append(batch.join(2, c))
            fed = [feeds["A"][t], feeds["B"][t]] + ([forced(2, 6)[len(got["C"]) - 1]] if got["C"] else [])
            out = batch.step(torch.tensor(fed, device=first.device))
            assert torch.isfinite(out).all()
            got["A"].append(out[0])
            got["B"].append(out[1])
            if got["C"] and len(got["C"]) < 4:
                got["C"].append(out[2])
        for name, p, fed in (("A", a, feeds["A"]), ("B", b, feeds["B"]), ("C", c, forced(2, 6)[:3])):
            ref = alone(model, p, fed[:len(got[name]) - 1])
            for t, (x, y) in enumerate(zip(ref, got[name], strict=True)):
                assert torch.allclose(x, y, **tol), f"{name}, step {t}: {(x - y).abs().max().item()}"
    finally:
        llm.to("cpu")
