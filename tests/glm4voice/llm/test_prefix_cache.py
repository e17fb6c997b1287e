"""Prefix caching: the slot placement policy, the key/value copy, and the engine with the cache
giving the same tokens as without it (multi-turn conversations, divergent histories, eviction
under pressure, many concurrent conversations), on the CPU with the tiny checkpoint.

The engine comparisons run the tiny model in float64: which requests share a decode step (and so
the shapes of its matmuls) depends on timing, and float32 rounding that differs between shapes and
chunkings would, now and then, move a sampled token across a boundary (with the cache or without).
In float64 such differences stay far below anything that changes a token, so the comparisons are
exact whatever the load."""

import asyncio
import copy

import pytest
import torch

from glm4voice.llm.engine import Engine, EngineConfig, SamplingParams
from glm4voice.llm.model import KVCache
from glm4voice.llm.prefix_cache import PrefixCache

SYSTEM = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]


def user_turn(i: int, conversation: int = 0) -> list[int]:
    """A distinct 'user message' per conversation and turn."""
    base = 1000 + 997 * conversation + 131 * i
    return [base + k for k in range(5 + (i + conversation) % 4)]


def cpu_config(**overrides) -> EngineConfig:
    options = {"device": "cpu", "dtype": "float32", "max_batch_size": 4, "max_seq_len": 512, "prefill_chunk": 16}
    return EngineConfig(**(options | overrides))


async def collect(stream) -> list[int]:
    return [token async for token in stream]


async def converse(engine, conversation: int, turns: int, params) -> list[list[int]]:
    """``turns`` turns of one conversation: each prompt is the previous prompt, its reply, and a
    new user message (how the pipeline builds a conversation's prompts)."""
    history, replies = list(SYSTEM), []
    for i in range(turns):
        prompt = history + user_turn(i, conversation)
        reply = await collect(engine.submit(prompt, params(conversation, i)))
        replies.append(reply)
        history = prompt + reply
    return replies


def greedy(conversation, turn):
    return SamplingParams(temperature=0, max_new_tokens=12)


def seeded(conversation, turn):
    return SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=100 * conversation + turn)


@pytest.fixture(scope="module")
def tiny64(tiny_llm):
    """The tiny model in float64 (see the module docstring)."""
    from glm4voice.llm.checkpoint import LoadedModel

    model = copy.deepcopy(tiny_llm.model).double()
    return LoadedModel(model, tiny_llm.config, tiny_llm.stop_ids, tiny_llm.folder)


def run_engine(model, config, body):
    async def main():
        async with Engine(model, config, stop_ids=()) as engine:
            result = await body(engine)
            await engine.wait_idle()
            return result, engine.stats()

    return asyncio.run(main())


# --- the placement policy ------------------------------------------------------------------------------


def finish(cache: PrefixCache, prompt, reply) -> int:
    """Place ``prompt``, record it and its reply as an engine would, release; returns the slot."""
    placement = cache.place(prompt)
    cache.written(placement.slot, placement.reuse, prompt[placement.reuse :])
    cache.prompt_done(placement.slot, len(prompt))
    for i, token in enumerate(reply):
        cache.drawn(placement.slot, len(prompt) + i, token)
    cache.release(placement.slot, keep=True)
    return placement.slot


def test_next_turn_reuses_everything_but_the_unfed_last_token():
    cache = PrefixCache(slots=4, capacity=64)
    prompt, reply = [1, 2, 3, 4], [7, 8, 9]
    assert finish(cache, prompt, reply) == 0
    assert cache.length[0] == len(prompt) + len(reply) - 1  # the last reply token was never fed
    placement = cache.place(prompt + reply + [5, 6])
    assert placement == type(placement)(slot=0, reuse=6, copy_from=None, evicted=False, repeat=False)
    cache.release(0, keep=True)
    # a prompt inside the cached one that was not its prompt: all but its last token are reused
    assert cache.place([1, 2, 3]).reuse == 2


def test_a_repeated_prompt_is_reused_whole_in_its_own_slot():
    """The same request again (a retry, the same seed): its whole prompt and first-token logits,
    in the slot that holds it (same slot, same decode batch rows: the same reply), even with a
    lower slot empty; the old reply is dropped."""
    cache = PrefixCache(slots=4, capacity=64)
    failed = cache.place([9, 9])  # slot 0, freed empty below
    assert finish(cache, [1, 2, 3, 4], [7, 8, 9]) == 1
    cache.release(failed.slot, keep=False)
    placement = cache.place([1, 2, 3, 4])
    assert (placement.slot, placement.reuse, placement.copy_from, placement.repeat) == (1, 4, None, True)
    assert cache.length[1] == 4 and cache.prompt_len[1] == 4
    # while it runs, the same prompt again comes from it (a copy of keys, values and logits)
    again = cache.place([1, 2, 3, 4])
    assert (again.slot, again.reuse, again.copy_from, again.repeat) == (0, 4, 1, True)
    # a longer prompt is no repeat
    assert not cache.place([1, 2, 3, 4, 5]).repeat


def test_divergence_reuses_only_the_common_prefix_and_keeps_the_other_history():
    cache = PrefixCache(slots=4, capacity=64)
    finish(cache, [1, 2, 3, 4, 5, 6], [7, 8])
    # shares [1, 2, 3]: an empty slot takes it (the cached conversation is kept), copying 3 positions
    placement = cache.place([1, 2, 3, 40, 50])
    assert (placement.slot, placement.reuse, placement.copy_from, placement.evicted) == (1, 3, 0, False)
    assert cache.length[0] == 7 and cache.length[1] == 3 and list(cache.tokens[1, :3]) == [1, 2, 3]
    # nothing in common: no reuse
    assert cache.place([99, 98]).reuse == 0


def test_a_superseded_cache_moves_to_the_lowest_free_slot():
    """Low slots keep decode batches small: a conversation that goes on moves down into a lower
    empty slot (one copy), and its old slot becomes empty."""
    cache = PrefixCache(slots=4, capacity=64)
    failed = cache.place([30, 31])  # slot 0, whose request will fail
    assert finish(cache, [10, 11], [5]) == 1 and finish(cache, [20, 21], [6]) == 2
    cache.release(failed.slot, keep=False)
    placement = cache.place([10, 11, 5, 12])
    assert (placement.slot, placement.reuse, placement.copy_from, placement.evicted) == (0, 2, 1, False)
    assert cache.length[1] == 0 and cache.length[2] == 2  # the old copy is dropped, the other kept


def test_busy_slots_are_sources_but_never_targets():
    cache = PrefixCache(slots=2, capacity=64)
    first = cache.place([1, 2, 3, 4, 5])
    cache.written(first.slot, 0, [1, 2, 3, 4, 5])
    second = cache.place([1, 2, 3, 9])  # the first request still runs
    assert (second.slot, second.reuse, second.copy_from) == (1, 3, 0)
    assert not cache.has_free_slot()
    with pytest.raises(RuntimeError, match="no free"):
        cache.place([1])


def test_least_recently_used_is_evicted_under_pressure():
    cache = PrefixCache(slots=2, capacity=64)
    a = finish(cache, [1, 2, 3], [4])
    b = finish(cache, [5, 6, 7], [8])
    assert (a, b) == (0, 1)
    cache.release(finish(cache, [1, 2, 3, 4, 9], [10]), keep=True)  # conversation a goes on: slot 0 used last
    placement = cache.place([20, 21])
    assert (placement.slot, placement.evicted, placement.reuse) == (1, True, 0)
    assert cache.length[0] > 0  # conversation a survived


def test_disabled_cache_never_reuses():
    cache = PrefixCache(slots=2, capacity=64, enabled=False)
    finish(cache, [1, 2, 3], [4])
    placement = cache.place([1, 2, 3, 4, 5])
    assert (placement.slot, placement.reuse, placement.copy_from) == (0, 0, None)
    assert cache.cached_slots() == 0


# --- the key/value copy ----------------------------------------------------------------------------------


def test_copied_prefix_then_suffix_prefill_equals_the_full_forward(tiny_llm):
    from glm4voice.llm.runner import ModelRunner

    model = tiny_llm.model
    first = SYSTEM + user_turn(0) + [500, 501, 502]
    second = first[:14] + [800, 801, 802, 803]  # diverges after 14 tokens
    runner = ModelRunner(model, 3, 64, cuda_graphs=False, compile=False)
    with torch.inference_mode():
        runner.prefill(0, first, 0, sample=False)
        runner.copy_prefix(0, 2, 14)
        suffix = model.prefill(torch.tensor(second[14:]), runner.cache, 2, 14, runner.rope, last_only=False)
    full = model(torch.tensor(second))
    torch.testing.assert_close(suffix, full[14:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.cache.kv[:, :, 2, :, :14], runner.cache.kv[:, :, 0, :, :14])
    assert not runner.cache.kv[:, :, 1].any()  # other slots untouched
    assert isinstance(runner.cache, KVCache)


# --- the engine with and without the cache ---------------------------------------------------------------


@pytest.mark.parametrize("params", [greedy, seeded], ids=["greedy", "seeded"])
def test_conversation_tokens_equal_with_and_without_the_prefix_cache(tiny64, params):
    async def body(engine):
        return await converse(engine, 0, 5, params)

    cached, on = run_engine(tiny64, cpu_config(), body)
    plain, off = run_engine(tiny64, cpu_config(prefix_cache=False), body)
    assert cached == plain and all(len(r) == 12 for r in cached)
    assert off.prefix_hits == 0 and off.prefix_tokens_reused == 0
    assert on.prefix_hits == 4  # every turn after the first
    # a later turn computes only its new tokens: the previous reply's last token and the user message
    new_tokens = sum(len(user_turn(i)) + 1 for i in range(1, 5))
    assert on.prompt_tokens == len(SYSTEM) + len(user_turn(0)) + new_tokens
    assert on.prompt_tokens + on.prefix_tokens_reused == off.prompt_tokens


def test_divergent_histories_are_computed_from_the_divergence(tiny64):
    """Branches of one history: the same prompt again, a different next message, a history cut
    inside the previous reply and continued differently, a prompt that is a prefix of a cached one."""

    async def body(engine):
        prompt = SYSTEM + user_turn(0)
        reply = await collect(engine.submit(prompt, greedy(0, 0)))
        branches = [
            prompt,
            prompt + reply + user_turn(1),
            prompt + reply + user_turn(2),
            prompt + reply[:5] + [4242, 4243],
            SYSTEM[:6],
            prompt + reply + user_turn(1) + [17],
        ]
        out = [reply]
        for i, branch in enumerate(branches):
            out.append(await collect(engine.submit(branch, seeded(1, i))))
        return out

    cached, on = run_engine(tiny64, cpu_config(), body)
    plain, _ = run_engine(tiny64, cpu_config(prefix_cache=False), body)
    assert cached == plain
    assert on.prefix_hits == 6


def test_eviction_under_memory_pressure_keeps_results_exact(tiny64):
    """Two slots, four conversations taking turns: caches are evicted (least recently used) and
    recomputed; results stay those of the engine without a cache."""

    async def body(engine):
        histories = {c: list(SYSTEM) for c in range(4)}
        replies = []
        for i in range(3):
            for c in (0, 1, 0, 2, 3, 1) if i else range(4):
                prompt = histories[c] + user_turn(i, c)
                reply = await collect(engine.submit(prompt, seeded(c, i)))
                histories[c] = prompt + reply
                replies.append(reply)
        return replies

    cached, on = run_engine(tiny64, cpu_config(max_batch_size=2), body)
    plain, _ = run_engine(tiny64, cpu_config(max_batch_size=2, prefix_cache=False), body)
    assert cached == plain
    assert on.prefix_evictions > 0 and on.prefix_hits > 0
    # every conversation shares SYSTEM: even evicted ones start from another slot's copy of it
    assert on.prefix_tokens_reused >= len(SYSTEM) * (len(cached) - 1)


@pytest.mark.parametrize("slots", [8, 3])
def test_many_concurrent_conversations(tiny64, slots):
    """8 conversations of 3 turns at once (with 3 slots: queueing and eviction as well)."""

    async def body(engine):
        return await asyncio.gather(*(converse(engine, c, 3, seeded) for c in range(8)))

    cached, on = run_engine(tiny64, cpu_config(max_batch_size=slots), body)
    plain, _ = run_engine(tiny64, cpu_config(max_batch_size=slots, prefix_cache=False), body)
    assert cached == plain
    if slots == 8:
        assert on.prefix_hits >= 8 * 2 and on.prefix_evictions == 0
    else:
        assert on.prefix_hits > 0


def test_continued_graph_body_draws_what_the_eager_prefill_draws(tiny_llm):
    """The body of a continuation prefill CUDA graph (static buffers: padded ids, slot/start/length
    on the device, the sampling counter start + n) run on the CPU: same token as the eager path."""
    from glm4voice.llm.runner import ModelRunner

    prompt = SYSTEM + user_turn(0) + user_turn(1)
    start, n, padded, kv_len = 10, len(prompt) - 10, 16, 32
    tokens = []
    for use_graph_body in (False, True):
        runner = ModelRunner(tiny_llm.model, 2, 64, cuda_graphs=False, compile=False)
        runner.set_sampling(1, 0.7, 0.9, 1234)
        runner.prefill(1, prompt[:start], 0, sample=False)
        if use_graph_body:
            runner._pf_ids = torch.zeros(padded, dtype=torch.long)
            runner._pf_ids[:n] = torch.tensor(prompt[start:])
            runner._pfc_meta.copy_(torch.tensor([1, start, n]))
            with torch.inference_mode():
                runner._continued_step(padded, kv_len)
            tokens.append(int(runner._pf_token[0]))
        else:
            tokens.append(runner.prefill(1, prompt[start:], start, sample=True))
    assert tokens[0] == tokens[1]


def test_drop_prefix_cache_forgets_cached_sequences(tiny_llm):
    async def body(engine):
        prompt = SYSTEM + user_turn(0)
        reply = await collect(engine.submit(prompt, greedy(0, 0)))
        engine.drop_prefix_cache()
        await collect(engine.submit(prompt + reply + user_turn(1), greedy(0, 1)))
        hits_after_drop = engine.stats().prefix_hits
        await collect(engine.submit(prompt + reply + user_turn(2), greedy(0, 2)))
        return hits_after_drop

    hits_after_drop, stats = run_engine(tiny_llm, cpu_config(), body)
    assert hits_after_drop == 0 and stats.prefix_hits == 1


def test_sample_first_draws_what_the_prefill_drew(tiny_llm):
    from glm4voice.llm.runner import ModelRunner

    runner = ModelRunner(tiny_llm.model, 3, 64, cuda_graphs=False, compile=False)
    prompt = SYSTEM + user_turn(0)
    for seed in (1, 2, 3, 4):
        runner.set_sampling(2, 1.0, 0.9, seed)
        drawn = runner.prefill(2, prompt, 0, sample=True)
        runner.copy_prefix(2, 0, len(prompt), first_logits=True)
        runner.set_sampling(0, 1.0, 0.9, seed)
        assert runner.sample_first(2, len(prompt)) == drawn == runner.sample_first(0, len(prompt))
    torch.testing.assert_close(runner.first_logits[0], runner.first_logits[2])


def test_the_same_seed_repeats_the_reply_with_the_cache(tiny_llm):
    """float32 and temperature 1 on the nearly flat tiny model, where any rounding difference would
    show: a repeated request (and a replayed conversation) gets exactly the same tokens, with other
    conversations' caches around."""
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=30, seed=1234)

    async def body(engine):
        await collect(engine.submit(SYSTEM + [7, 7, 7], params))  # another conversation, cached
        first = await converse(engine, 3, 3, lambda c, t: params)
        again = await converse(engine, 3, 3, lambda c, t: params)
        return first, again

    (first, again), stats = run_engine(tiny_llm, cpu_config(), body)
    assert first == again
    assert stats.prefix_hits >= 5


def test_a_lone_stream_decodes_as_one_row_whatever_its_slot(tiny_llm):
    """Cached conversations keep the low slots; a new stream in a high slot still decodes in a batch
    of one row (decode batches are compact: row j works on any slot)."""
    from glm4voice.llm.runner import DecodeRow

    async def body(engine):
        for c in range(3):
            await collect(engine.submit(SYSTEM[:3] + user_turn(0, c), greedy(c, 0)))
        batches = []
        real_launch = engine.runner.launch
        engine.runner.launch = lambda rows, after=None: (
            batches.append((tuple(r.slot for r in (after.rows if after else rows)), len(rows)))
            or real_launch(rows, after)
        )
        tokens = await collect(engine.submit(user_turn(5, 9), greedy(9, 0)))
        return batches, tokens

    (batches, tokens), stats = run_engine(tiny_llm, cpu_config(), body)
    assert {slots for slots, _ in batches} == {(3,)} and {n for _, n in batches} == {1}
    assert stats.prefix_evictions == 0 and len(tokens) == 12
    with pytest.raises(ValueError, match="at most once"):
        from glm4voice.llm.runner import ModelRunner

        ModelRunner(tiny_llm.model, 2, 32, cuda_graphs=False, compile=False).launch(
            [DecodeRow(1, 5, 3), DecodeRow(1, 6, 4)]
        )
