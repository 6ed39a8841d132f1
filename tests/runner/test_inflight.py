"""In-flight batching in the batch itself: requests joining a running batch at step boundaries get the tokens they
get alone (greedy, and sampled with a seed), and the running rows keep theirs; with a StepSync (the TP leader's
lockstep mode) as without one (the next step launched ahead)."""
# ruff: noqa: F811 - the tiny_family fixture is imported from test_batching and named by the tests' parameters

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.runner.test_batching import Tiny, tiny_family  # noqa: F401 - the fixture
from vlmforge.runner import batching
from vlmforge.runner.batching import Changes, GreedyBatch, greedy_batch
from vlmforge.runner.sampling import SamplingParams

SAMPLED = SamplingParams(temperature=1.0, seed=1234)


class Lockstep:
    """A StepSync recording what rank 0 sends; joiners' payloads are (prefix, limit), what a follower is handed."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[int], bool, Changes | None]] = []

    def step(self, tokens: torch.Tensor, go_on: bool, changes: Changes | None = None) -> None:
        self.sent.append((tokens.tolist(), go_on, changes))


class Replay:
    def __init__(self, sent: list[tuple[list[int], bool, Changes | None]]) -> None:
        self.sent = iter(sent)

    def step(self, size: int) -> tuple[torch.Tensor, bool, Changes | None]:
        tokens, go_on, changes = next(self.sent)
        assert len(tokens) == size, "the follower's batch has as many rows as rank 0's"
        return torch.tensor(tokens), go_on, changes


Join = tuple[int, int, SamplingParams | None]
"""(prefix index, token limit, sampling) of a request joining at a boundary."""


def drive(t: Tiny, rows: list[int], limits: list[int], joins: dict[int, list[Join]], *, sync: Any = None,
          sampling: list[SamplingParams | None] | None = None, capacity: int | None = None, **options: Any,
          ) -> tuple[GreedyBatch, list[list[tuple[int, int]]], list[int | None]]:
    """Run a batch of ``rows``' prefixes; at boundary k (after the k-th events) admit ``joins[k]``. Returns the
    batch, each boundary's (request, token) events and what each admit returned. ``options``: GreedyBatch's."""
    prefixes = t.prefixes()
    batch = GreedyBatch(t.llm, [prefixes[i] for i in rows], limits, keep_logits=True, sync=sync,
                        sampling=sampling, capacity=capacity, **options)
    seen, admitted = [], []
    for boundary, events in enumerate(batch):
        seen.append([(e.row, e.token) for e in events])
        for index, limit, params in joins.get(boundary, []):
            admitted.append(batch.admit(prefixes[index], limit, params, payload=(prefixes[index], limit)))
    return batch, seen, admitted


def assert_lone(t: Tiny, batch: GreedyBatch, order: list[int]) -> None:
    """Request i of the batch (admission order) decoded prefix ``order[i]`` exactly as it decodes alone."""
    results = batch.results()
    alone = t.alone([16] * len(t.prompts))
    for seq, index in enumerate(order):
        want = alone[index].tokens[:batch.limits[seq]]
        assert results[seq].tokens == want, f"request {seq} (prefix {index})"
        assert (results[seq].logits - alone[index].logits[:len(want)]).abs().max().item() < 1e-4, seq


@pytest.mark.parametrize("mode", ["ahead", "lockstep"])
@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_joiners_get_their_lone_tokens_and_the_running_rows_keep_theirs(tiny_family: Tiny, mode: str) -> None:
    """Rows 0 and 1 start; prefix 3 joins at the first boundary (a new row); row 1 ends after 4 tokens and prefix 2,
    longer than every running row (everyone is re-padded), joins into its row; prefix 4 joins later, appended."""
    t = tiny_family
    lengths = [p.length for p in t.prefixes()]
    if t.family.takes_prompt:
        assert lengths[2] > max(lengths[0], lengths[1], lengths[3]), "the second joiner must be the longest"
    sync = Lockstep() if mode == "lockstep" else None
    batch, seen, admitted = drive(t, [0, 1], [16, 4], {0: [(3, 12, None)], 4: [(2, 16, None)], 6: [(4, 9, None)]},
                                  sync=sync)
    assert admitted == [2, 3, 4]
    assert_lone(t, batch, [0, 1, 3, 2, 4])
    assert batch.finish == ["length"] * 5
    state = batch._state
    assert state is not None and state.size == 4, "the second joiner reused the finished row"
    # a joiner's first token comes with the events right after its boundary
    assert 2 in [r for r, _ in seen[1]] and 3 in [r for r, _ in seen[5]] and 4 in [r for r, _ in seen[7]]
    assert all(r != 3 for step in seen[:5] for r, _ in step)
    if sync is not None:  # what a follower is sent makes it run the same rows (and the same trims)
        assert any(c is not None and c.joined for _, _, c in sync.sent)
        made: list[Any] = []
        make = batching.make_batch

        def recording(llm: Any, prefixes: Any) -> Any:
            made.append(make(llm, prefixes))
            return made[-1]

        try:
            batching.make_batch = recording  # type: ignore[assignment]
            steps = batching.follow_batch(t.llm, [t.prefixes()[0], t.prefixes()[1]], Replay(sync.sent))
        finally:
            batching.make_batch = make  # type: ignore[assignment]
        assert steps == batch.steps
        assert made[0].size == state.size and torch.equal(made[0].mask, state.mask)


@pytest.mark.parametrize("mode", ["ahead", "lockstep"])
@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_a_batch_whose_rows_all_ended_goes_on_with_a_joiner(tiny_family: Tiny, mode: str) -> None:
    t = tiny_family
    batch, seen, admitted = drive(t, [4], [2], {1: [(0, 10, None)]}, sync=Lockstep() if mode == "lockstep" else None)
    assert admitted == [1] and len(seen) == 12  # 2 boundaries for the first request, 10 for the joiner
    assert_lone(t, batch, [4, 0])
    assert batch._state is not None and batch._state.size == 1, "the joiner reused the only row"


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_left_columns_no_live_row_needs_are_trimmed(tiny_family: Tiny) -> None:
    """The long joiner pads everyone to its length; once it and the rows it padded are gone, the short rows'
    cache shrinks back (attention over columns nobody needs would cost every later step)."""
    t = tiny_family
    short, long = t.prefixes()[1].length, t.prefixes()[2].length
    assert long > short + 12
    batch, _, _ = drive(t, [1, 1], [12, 12], {0: [(2, 3, None)]})
    state = batch._state
    assert state is not None
    # the prompt, then 11 steps (the 12th token is the last: no step after it); not the long joiner's length
    assert state.mask.shape[1] == short + 11 and state.cache.layers[0].keys.shape[2] == short + 11
    assert_lone(t, batch, [1, 1, 2])


@pytest.mark.parametrize("mode", ["ahead", "lockstep"])
@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_a_seeded_joiner_samples_what_it_samples_alone(tiny_family: Tiny, mode: str) -> None:
    """Into a greedy batch (the sampler is made when the first sampled request joins; the greedy rows keep their
    tokens) and into a sampled batch's finished row (its generator and counts start over)."""
    t = tiny_family
    prefixes = t.prefixes()
    alone = greedy_batch(t.llm, [prefixes[2]], [10], sampling=[SAMPLED])[0].tokens
    penalized = SamplingParams(temperature=0.8, seed=7, frequency_penalty=1.5, min_tokens=6)
    alone_penalized = greedy_batch(t.llm, [prefixes[3]], [10], sampling=[penalized])[0].tokens
    greedy = [r.tokens for r in t.alone([16] * 5)]

    def sync() -> Any:
        return Lockstep() if mode == "lockstep" else None

    batch, _, admitted = drive(t, [0, 1], [16, 3], {2: [(2, 10, SAMPLED)]}, sync=sync())
    assert admitted == [2]
    assert batch.tokens[2] == alone and batch.tokens[0] == greedy[0] and batch.tokens[1] == greedy[1][:3]
    batch, _, admitted = drive(t, [0, 1], [16, 3], {3: [(3, 10, penalized)]}, sync=sync(),
                               sampling=[SamplingParams(temperature=0.9, seed=5), SAMPLED])
    assert admitted == [2] and batch._state is not None and batch._state.size == 2, "row 1 was reused"
    assert batch.tokens[2] == alone_penalized
    assert batch.tokens[1] == greedy_batch(t.llm, [prefixes[1]], [3], sampling=[SAMPLED])[0].tokens


@pytest.mark.parametrize("tiny_family", ["llava", "blip2-t5"], indirect=True)
def test_capacity_and_kinds_without_joins_refuse_with_none(tiny_family: Tiny) -> None:
    t = tiny_family
    joins = {0: [(2, 4, None), (3, 4, None)], 1: [(4, 4, None)]}
    batch, _, admitted = drive(t, [0], [6], joins, capacity=2)
    if t.family.encoder_decoder:  # T5: the encoder side is the batch's; requests wait for the next batch
        assert admitted == [None, None, None] and len(batch.finish) == 1
        return
    assert admitted == [1, None, None], "two live requests at most"
    assert_lone(t, batch, [0, 2])
    with pytest.raises(RuntimeError, match="step boundary"):
        batch.admit(t.prefixes()[3], 4)


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_in_lockstep_a_joiners_prefix_is_made_after_the_followers_are_told(tiny_family: Tiny) -> None:
    """Making a prefix runs the LLM's embedding, a collective under tensor parallelism (sharded): rank 0 must make it
    after the step message, where the followers make theirs, or the ranks wait on each other for good (the TP 2
    runner hung so before this order)."""
    t = tiny_family
    prefixes = t.prefixes()
    order: list[str] = []

    class Told(Lockstep):
        def step(self, tokens: torch.Tensor, go_on: bool, changes: Changes | None = None) -> None:
            order.append("message" if changes is None or not changes.joined else "message with the joiner")
            super().step(tokens, go_on, changes)

    def make() -> Any:
        order.append("prefix made")
        return prefixes[3]

    batch = GreedyBatch(t.llm, [prefixes[0]], [6], sync=Told(), keep_logits=True)
    for boundary, _ in enumerate(batch):
        if boundary == 1:
            assert batch.admit(make, 5, length=prefixes[3].length, payload="job") == 1
            order.append("admitted")
    at = order.index("prefix made")
    assert order[at - 2:at] == ["admitted", "message with the joiner"] and order.count("prefix made") == 1
    assert_lone(t, batch, [0, 3])


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_joiners_on_the_static_path_get_their_lone_tokens(tiny_family: Tiny) -> None:
    """The GreedyBatch admission on the static decode path (StaticBatch.room/join/retire; eager steps here, no
    compile): three requests start in a bucket of 4 rows; a fourth joins the free dummy row at the first boundary, a
    fifth takes the row of the first to finish. Every request decodes what it decodes alone."""
    from vlmforge.runner.static import StaticDecoder

    t = tiny_family
    prefixes = t.prefixes()
    shortest = min(range(3), key=lambda i: prefixes[i].length)
    static = StaticDecoder(t.llm, max_batch_size=4, length_multiple=64, compile=False, graphs=False)
    limits = [16, 3, 16]
    batch = GreedyBatch(t.llm, prefixes[:3], limits, keep_logits=True, factory=static.batch, capacity=4)
    admitted: list[int | None] = []
    order = [0, 1, 2]
    for boundary, _ in enumerate(batch):
        if boundary == 0:
            admitted.append(batch.admit(prefixes[shortest], 8))
            order.append(shortest)
        if boundary == 3:  # request 1 (3 tokens) has just finished: its row is free again
            admitted.append(batch.admit(prefixes[shortest], 4))
            order.append(shortest)
    assert admitted == [3, 4], "both joined (a dummy row, then a retired one)"
    results = batch.results()
    alone = t.alone([16] * len(t.prompts))
    for seq, index in enumerate(order):
        want = alone[index].tokens[:batch.limits[seq]]
        assert results[seq].tokens == want, f"request {seq} (prefix {index})"


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_a_full_static_bucket_grows_into_a_warmed_larger_one(tiny_family: Tiny) -> None:
    """A static batch started by one request sits in a bucket of one row: a joiner moves it into the (already made)
    bucket of two rows at the same length, the next into four. Everyone decodes what it decodes alone; without a
    larger bucket made beforehand, nobody joins (making one mid-batch would stall the running rows to compile)."""
    from vlmforge.runner.static import StaticDecoder, bucket_length

    t = tiny_family
    prefixes = t.prefixes()
    longest = max(range(len(prefixes)), key=lambda i: prefixes[i].length)
    others = [i for i in range(len(prefixes)) if i != longest][:2]

    def run(made: bool) -> tuple[GreedyBatch, list[int | None]]:
        static = StaticDecoder(t.llm, max_batch_size=4, length_multiple=64, compile=False, graphs=False)
        length = bucket_length(prefixes[longest].length + 16, 64, static.max_length)
        if made:
            for rows in (2, 4):
                static._slot(rows, length)
        batch = GreedyBatch(t.llm, [prefixes[longest]], [16], keep_logits=True, factory=static.batch, capacity=4)
        admitted = []
        for boundary, _ in enumerate(batch):
            if boundary < 2:
                admitted.append(batch.admit(prefixes[others[boundary]], 8))
        return batch, admitted

    batch, admitted = run(made=True)
    assert admitted == [1, 2]
    assert batch._state.slot.batch == 4  # type: ignore[union-attr]
    alone = t.alone([16] * len(t.prompts))
    for seq, index in enumerate([longest, *others]):
        assert batch.results()[seq].tokens == alone[index].tokens[:batch.limits[seq]], f"request {seq}"
    assert run(made=False)[1] == [None, None]


class Prefills:
    """The batch sizes of the LLM's prefill forwards (those fed ``inputs_embeds``; a step is fed token ids)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.llm = llm

    def __enter__(self) -> Prefills:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if kwargs.get("inputs_embeds") is not None:
                self.sizes.append(int(kwargs["inputs_embeds"].shape[0]))

        self.handle = self.llm.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def replay_follower(t: Tiny, rows: list[int], sync: Lockstep) -> tuple[Any, list[int], int]:
    """A follower fed what rank 0 sent: its batch state, its prefill sizes and steps."""
    made: list[Any] = []
    make = batching.make_batch

    def recording(llm: Any, prefixes: Any) -> Any:
        made.append(make(llm, prefixes))
        return made[-1]

    try:
        batching.make_batch = recording  # type: ignore[assignment]
        with Prefills(t.llm) as prefills:
            steps = batching.follow_batch(t.llm, [t.prefixes()[i] for i in rows], Replay(sync.sent))
    finally:
        batching.make_batch = make  # type: ignore[assignment]
    return made[0], prefills.sizes, steps


@pytest.mark.parametrize("joins", ["batched", "single"])
@pytest.mark.parametrize("mode", ["ahead", "lockstep"])
@pytest.mark.parametrize("tiny_family", ["llava", "blip2-opt"], indirect=True)
def test_joiners_of_one_boundary_are_prefilled_together_and_get_their_lone_results(tiny_family: Tiny, mode: str,
                                                                                    joins: str) -> None:
    """Rows 0, 1, 3 start (request 1 ends after 3 tokens); at boundary 0 prefixes 4 and 1 join (two new rows); at
    boundary 3 prefixes 2 (the longest: every row is re-padded to its length), 0 and 4 join at once (row 1, retired,
    then two new rows). Every request's tokens and logits are its lone ones (1e-4) and each boundary's joiners went
    through ONE left-padded prefill forward (``batched_joins=False``: one each, the behaviour before); a follower
    replaying rank 0's messages runs the same prefills and ends with the same rows."""
    t = tiny_family
    lengths = [p.length for p in t.prefixes()]
    sync = Lockstep() if mode == "lockstep" else None
    with Prefills(t.llm) as prefills:
        joiners = {0: [(4, 9, None), (1, 12, None)], 3: [(2, 10, None), (0, 5, None), (4, 6, None)]}
        batch, seen, admitted = drive(t, [0, 1, 3], [16, 3, 16], joiners, sync=sync, batched_joins=joins == "batched")
    assert admitted == [3, 4, 5, 6, 7]
    assert_lone(t, batch, [0, 1, 3, 4, 1, 2, 0, 4])
    assert prefills.sizes == ([3, 2, 3] if joins == "batched" else [3, 1, 1, 1, 1, 1])
    state = batch._state
    assert state is not None and state.size == 7, "request 5 took the retired row 1"
    assert {3, 4} <= {r for r, _ in seen[1]} and {5, 6, 7} <= {r for r, _ in seen[4]}, "first tokens next step"
    if t.family.takes_prompt:
        assert lengths[2] > max(lengths[i] for i in (0, 1, 3)) + 3, "the second boundary's first joiner re-pads all"
    if sync is not None:
        assert [c.batched for _, _, c in sync.sent if c is not None and c.joined] == [joins == "batched"] * 2
        follower, sizes, steps = replay_follower(t, [0, 1, 3], sync)
        assert steps == batch.steps and sizes == prefills.sizes
        assert follower.size == state.size and torch.equal(follower.mask, state.mask)


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_max_prefill_tokens_leaves_joiners_beyond_it_for_the_next_boundary(tiny_family: Tiny) -> None:
    """The cap counts padded positions (joiners x the longest): at boundary 0 prefixes 2 and 0 fit, 4 does not and
    joins at the next boundary; a lone joiner longer than the cap still joins (the first of its boundary)."""
    t = tiny_family
    lengths = [p.length for p in t.prefixes()]
    cap = 2 * max(lengths[2], lengths[0])
    assert 3 * lengths[2] > cap and lengths[2] > 1
    with Prefills(t.llm) as prefills:
        batch, _, admitted = drive(t, [3], [16], {0: [(2, 6, None), (0, 6, None), (4, 6, None)], 1: [(4, 6, None)]},
                                   max_prefill_tokens=cap)
    assert admitted == [1, 2, None, 3]
    assert prefills.sizes == [1, 2, 1]
    assert_lone(t, batch, [3, 2, 0, 4])
    batch, _, admitted = drive(t, [3], [4], {0: [(2, 3, None), (0, 3, None)]}, max_prefill_tokens=lengths[2] - 1)
    assert admitted == [1, None]
    assert_lone(t, batch, [3, 2])


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_has_room_counts_the_requests_ahead_of_it(tiny_family: Tiny) -> None:
    """The scheduler asks before encoding, for each waiting request after those it will admit first: capacity and the
    prefill cap count them."""
    t = tiny_family
    length = t.prefixes()[0].length
    batch = GreedyBatch(t.llm, [t.prefixes()[3]], [4], capacity=3, max_prefill_tokens=2 * length)
    for boundary, _ in enumerate(batch):
        if boundary == 0:
            assert batch.has_room(length, 3) and batch.has_room(length, 3, [length])
            assert not batch.has_room(length, 3, [length, length]), "capacity 3: the running request and two"
            assert not batch.has_room(length + 1, 3, [length]), "2 x (length + 1) positions exceed the cap"


@pytest.mark.parametrize("tiny_family", ["llava"], indirect=True)
def test_joiners_of_one_boundary_share_one_prefill_on_the_static_path(tiny_family: Tiny) -> None:
    """Through GreedyBatch on the static decode path (eager steps here): three requests start in a bucket of 4 rows;
    when request 1 has finished, the two shortest prefixes join at one boundary (its retired row and the dummy row),
    in one eager prefill copied into the bucket. Every request decodes what it decodes alone."""
    from vlmforge.runner.static import StaticDecoder

    t = tiny_family
    prefixes = t.prefixes()
    short = sorted(range(len(prefixes)), key=lambda i: prefixes[i].length)[:2]
    assert prefixes[short[0]].length != prefixes[short[1]].length
    static = StaticDecoder(t.llm, max_batch_size=4, length_multiple=64, compile=False, graphs=False)
    batch = GreedyBatch(t.llm, prefixes[:3], [16, 3, 16], keep_logits=True, factory=static.batch, capacity=4)
    admitted: list[int | None] = []
    with Prefills(t.llm) as prefills:
        for boundary, _ in enumerate(batch):
            if boundary == 3:
                admitted += [batch.admit(prefixes[short[0]], 8), batch.admit(prefixes[short[1]], 6)]
    assert admitted == [3, 4] and prefills.sizes[1:] == [2]
    state: Any = batch._state
    assert state.size == 4 and state.slot.batch == 4
    assert_lone(t, batch, [0, 1, 2, *short])
