"""The engine contract on the CPU with the tiny checkpoint."""

import asyncio
import math
import sys
import threading

import pytest
import torch

from glm4voice.defaults import FLOAT32_SMALLEST_NORMAL, TEMPERATURE
from glm4voice.llm import engine as engine_module
from glm4voice.llm.engine import (
    Engine,
    EngineBusyError,
    EngineConfig,
    EngineNotRunningError,
    EngineStoppedError,
    FinishReason,
    GenerationError,
    InvalidPromptError,
    InvalidSamplingParams,
    PromptTooLongError,
    SamplingParams,
)

from support import until

PROMPTS = [
    [5, 9, 13],
    list(range(100, 141)),
    [7] * 12,
    [3000, 2, 17000, 44, 9],
    list(range(500, 520)),
    [1],
    list(range(2000, 2065, 2)),
    [18000, 17999, 600, 601, 602, 603, 11],
]
GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


def cpu_config(**overrides) -> EngineConfig:
    options = dict(device="cpu", dtype="float32", max_batch_size=8, max_seq_len=256, prefill_chunk=16)
    return EngineConfig(**(options | overrides))


def run(coro):
    return asyncio.run(coro)


async def collect(stream) -> list[int]:
    return [token async for token in stream]


def greedy_reference(model, prompt, n):
    """Greedy continuation by full forwards (no cache at all)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt) :]


def test_greedy_is_the_same_alone_and_in_a_batch_of_8(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            alone = [await collect(engine.submit(p, GREEDY)) for p in PROMPTS]
            streams = [engine.submit(p, GREEDY) for p in PROMPTS]
            together = await asyncio.gather(*(collect(s) for s in streams))
            assert all(s.finish_reason is FinishReason.LENGTH for s in streams)
            return alone, together, engine.stats()

    alone, together, stats = run(main())
    assert together == alone
    assert all(len(tokens) == 20 for tokens in alone)
    assert len({tuple(t) for t in alone}) == len(PROMPTS)
    for prompt, tokens in zip(PROMPTS[:2], alone):
        assert tokens == greedy_reference(tiny_llm.model, prompt, 20)
    assert stats.tokens_generated == 2 * 20 * len(PROMPTS) and stats.requests_finished == 2 * len(PROMPTS)
    # the second time, each prompt is a repeat: kept whole with its first-token logits, nothing computed
    assert stats.prefix_tokens_reused == sum(map(len, PROMPTS)) and stats.prefix_hits == len(PROMPTS)
    assert stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.active_streams == 0 and stats.queued == 0


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=1234)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            first = await collect(engine.submit(PROMPTS[3], params))
            again = await collect(engine.submit(PROMPTS[3], params))
            others = [engine.submit(p, SamplingParams(temperature=1.0, max_new_tokens=16)) for p in PROMPTS[:4]]
            in_batch = engine.submit(PROMPTS[3], params)
            results = await asyncio.gather(collect(in_batch), *(collect(s) for s in others))
            other_seed = await collect(
                engine.submit(PROMPTS[3], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=99))
            )
            return first, again, results[0], other_seed

    first, again, in_batch, other_seed = run(main())
    assert first == again == in_batch
    assert first != other_seed


def test_stop_ids_end_the_stream_and_the_stop_token_is_yielded(tiny_llm, tiny_checkpoints):
    async def main():
        async with Engine(tiny_llm, cpu_config()) as engine:
            assert engine.stop_ids == frozenset(tiny_checkpoints.vocab.eos_token_ids)
            free = await collect(engine.submit(PROMPTS[0], GREEDY))
            stop_at = free[3]
            stream = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=20, stop_ids={stop_at}))
            return free, await collect(stream), stream

    free, stopped, stream = run(main())
    first = free.index(free[3])
    assert stopped == free[: first + 1] and stopped[-1] == free[3]
    assert stream.finish_reason is FinishReason.STOP and stream.tokens_generated == len(stopped)


def test_length_limits(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(max_seq_len=32), stop_ids=()) as engine:
            short = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=1))
            one = await collect(short)
            near_full = engine.submit(list(range(1, 30)), SamplingParams(temperature=0, max_new_tokens=100))
            rest = await collect(near_full)
            with pytest.raises(PromptTooLongError, match="at most 31"):
                engine.submit(list(range(1, 33)), GREEDY)
            return one, short, rest, near_full

    one, short, rest, near_full = run(main())
    assert len(one) == 1 and short.finish_reason is FinishReason.LENGTH
    assert len(rest) == 32 - 29 and near_full.finish_reason is FinishReason.LENGTH


def test_cancel_frees_the_slot_within_one_step(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(max_batch_size=1), stop_ids=()) as engine:
            long = engine.submit(PROMPTS[1], SamplingParams(temperature=1.0, max_new_tokens=200))
            got = [await long.__anext__() for _ in range(3)]
            queued = engine.submit(PROMPTS[0], GREEDY)  # waits: the only slot is busy
            queued.cancel()
            assert await collect(queued) == [] and queued.finish_reason is FinishReason.CANCELLED
            long.cancel()
            # read after the cancel: the worker steps on meanwhile (this thread may be preempted between the two)
            steps_at_cancel = engine.stats().decode_steps
            assert await collect(long) == []
            await engine.wait_idle()
            stats = engine.stats()
            assert stats.active_streams == 0 and stats.queued == 0
            assert stats.decode_steps - steps_at_cancel <= 1
            after = await collect(engine.submit(PROMPTS[0], GREEDY))  # the slot is free again
            return got, long, after

    got, long, after = run(main())
    assert len(got) == 3 and long.finish_reason is FinishReason.CANCELLED and len(after) == 20


def test_async_with_cancels_on_early_exit(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(max_batch_size=1), stop_ids=()) as engine:
            async with engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=200)) as stream:
                async for _ in stream:
                    break
            await engine.wait_idle()
            return stream, engine.stats()

    stream, stats = run(main())
    assert stream.finish_reason is FinishReason.CANCELLED and stats.active_streams == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": 1e39}, "temperature"),  # overflows float32 (it used to kill the worker)
        ({"temperature": 10**400}, "temperature"),  # too large for a float at all
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": TEMPERATURE.high * 1.01}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": -math.inf}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop_ids": ["a"]}, "stop_ids"),
        ({"stop_ids": [-3]}, "stop_ids"),
    ],
)
def test_bad_sampling_values_are_rejected(kwargs, message):
    with pytest.raises(InvalidSamplingParams, match=message):
        SamplingParams(**kwargs)
    assert issubclass(InvalidSamplingParams, ValueError)


def test_extreme_but_valid_sampling_values_are_served(tiny_llm):
    """The smallest top_p and temperature float32 can hold both mean the most probable token (no
    index error); the largest temperature is served too. Below float32 (1e-50) they are refused."""
    for name in ("top_p", "temperature"):
        with pytest.raises(InvalidSamplingParams, match=name):
            SamplingParams(**{name: 1e-50})
    params = [
        SamplingParams(temperature=1.0, top_p=FLOAT32_SMALLEST_NORMAL, max_new_tokens=20, seed=3),
        SamplingParams(temperature=FLOAT32_SMALLEST_NORMAL, max_new_tokens=20, seed=3),
        SamplingParams(temperature=TEMPERATURE.high, max_new_tokens=20, seed=3),
        SamplingParams(temperature=2, top_p=1, max_new_tokens=20, seed=3),
    ]
    assert isinstance(params[3].temperature, float) and isinstance(params[3].top_p, float)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            greedy = await collect(engine.submit(PROMPTS[1], GREEDY))
            results = await asyncio.gather(*(collect(engine.submit(PROMPTS[1], p)) for p in params))
            return greedy, results, engine.stats()

    greedy, (tiny_top_p, tiny_temperature, hottest, _), stats = run(main())
    assert tiny_top_p == greedy and tiny_temperature == greedy
    assert len(hottest) == 20 and hottest != greedy
    assert stats.requests_failed == 0 and stats.running


def test_bad_requests_are_rejected_at_submit(tiny_llm):
    engine = Engine(tiny_llm, cpu_config(max_batch_size=1, max_queue=2), stop_ids=())
    with pytest.raises(EngineNotRunningError):
        engine.submit([1, 2], GREEDY)
    vocab = tiny_llm.config.vocab_size

    async def main():
        await engine.start()
        for prompt, error, message in [
            ([], InvalidPromptError, "empty"),
            ([1, vocab], InvalidPromptError, "outside the vocabulary"),
            ([-1, 2], InvalidPromptError, "outside the vocabulary"),
            ("hello", InvalidPromptError, "not text"),
            ([1, 2.5], InvalidPromptError, "integers"),
            ([1] * 256, PromptTooLongError, "255"),
        ]:
            with pytest.raises(error, match=message):
                engine.submit(prompt, GREEDY)
        with pytest.raises(TypeError, match="SamplingParams"):
            engine.submit([1], {"temperature": 0})
        running = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200))
        await running.__anext__()  # it holds the only slot now
        waiting = [engine.submit(PROMPTS[0], GREEDY) for _ in range(2)]
        with pytest.raises(EngineBusyError, match="max_queue=2"):
            engine.submit(PROMPTS[0], GREEDY)
        assert engine.stats().queued == 2
        running.cancel()
        finished = [await collect(s) for s in waiting]
        await engine.stop()
        with pytest.raises(EngineNotRunningError):
            engine.submit([1, 2], GREEDY)
        return finished

    assert [len(t) for t in run(main())] == [20, 20]


def test_a_failing_request_does_not_take_the_others_down(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            runner = engine.runner
            real_prefill = runner.prefill

            def prefill(slot, ids, start, sample):
                if 4242 in ids:
                    raise RuntimeError("injected prefill failure")
                return real_prefill(slot, ids, start, sample)

            runner.prefill = prefill
            good = engine.submit(PROMPTS[0], GREEDY)
            bad = engine.submit([1, 4242, 3], GREEDY)
            with pytest.raises(GenerationError, match="injected prefill failure") as error:
                await collect(bad)
            assert isinstance(error.value.__cause__, RuntimeError) and bad.finish_reason is FinishReason.ERROR
            good_tokens = await collect(good)

            calls = []
            real_launch = runner.launch

            def launch(rows, after=None):
                calls.append(len(rows))
                if len(rows) == 2:  # the first step that decodes both streams (whatever the timing)
                    raise RuntimeError("injected decode failure")
                return real_launch(rows, after)

            runner.launch = launch
            broken = [engine.submit(p, GREEDY) for p in PROMPTS[:2]]
            outcomes = await asyncio.gather(*(collect(s) for s in broken), return_exceptions=True)
            assert all(isinstance(o, GenerationError) for o in outcomes)
            after = await collect(engine.submit(PROMPTS[0], GREEDY))
            return good_tokens, after, engine.stats()

    good_tokens, after, stats = run(main())
    assert len(good_tokens) == 20 and after == good_tokens
    assert stats.requests_failed == 3 and stats.running


def test_a_request_whose_sampling_setup_fails_fails_alone(tiny_llm):
    """A value that gets past validation and cannot be set on the device (float32 overflow) ends
    that request only; streams already running and later requests go on."""
    bad = SamplingParams(temperature=1.0, max_new_tokens=20)
    object.__setattr__(bad, "temperature", 1e39)  # what the validation now refuses

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            running = engine.submit(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=40))
            first = await running.__anext__()
            failing = engine.submit(PROMPTS[0], bad)
            with pytest.raises(GenerationError, match="overflow"):
                await collect(failing)
            rest = await collect(running)
            after = await collect(engine.submit(PROMPTS[0], GREEDY))
            return [first, *rest], failing, after, engine

    tokens, failing, after, engine = run(main())
    assert len(tokens) == 40 and tokens[:20] == greedy_reference(tiny_llm.model, PROMPTS[1], 20)
    assert failing.finish_reason is FinishReason.ERROR and len(after) == 20
    assert engine.stats().requests_failed == 1 and not engine.dead and engine.failure is None


def test_a_broken_device_stops_the_worker_and_says_so(tiny_llm):
    """A CUDA error poisons the device for everyone: the worker stops, every stream ends with an
    error, submit() refuses, and the owner learns it through wait_closed() and the callback."""

    async def main():
        engine = Engine(tiny_llm, cpu_config(), stop_ids=())
        await engine.start()
        failures = []
        engine.add_failure_callback(failures.append)
        runner = engine.runner
        real_launch = runner.launch

        all_submitted = threading.Event()

        def launch(rows, after=None):
            if len(rows) == 2:
                all_submitted.wait()  # the worker dies only after the test has submitted everything
                raise RuntimeError("CUDA error: device-side assert triggered")
            return real_launch(rows, after)

        runner.launch = launch
        first = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=200))
        await first.__anext__()
        second = engine.submit(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=200))
        queued = [engine.submit(PROMPTS[2], GREEDY) for _ in range(8)]  # 6 of them wait for a slot
        all_submitted.set()
        outcomes = await asyncio.gather(*(collect(s) for s in (first, second, *queued)), return_exceptions=True)
        error = await asyncio.wait_for(engine.wait_closed(), timeout=60)
        with pytest.raises(EngineNotRunningError, match="device-side assert"):
            engine.submit(PROMPTS[0], GREEDY)
        late = []
        engine.add_failure_callback(late.append)  # registered after the death: called at once
        await engine.stop()  # harmless on a dead engine
        return engine, outcomes, error, failures, late

    engine, outcomes, error, failures, late = run(main())
    assert all(isinstance(o, GenerationError) for o in outcomes), outcomes
    assert engine.dead and not engine.running and not engine.stats().running
    assert error is engine.failure and failures == [error] and late == [error]
    assert "device" in str(error) and "device-side assert" in str(error.__cause__)


def test_repeated_failures_stop_the_worker(tiny_llm, monkeypatch):
    import glm4voice.llm.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_CONSECUTIVE_FAILURES", 3)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            all_submitted = threading.Event()

            def prefill(*args, **kwargs):
                all_submitted.wait()  # no failure before the test has submitted all five
                raise MemoryError("no memory")

            engine.runner.prefill = prefill
            streams = [engine.submit(p, GREEDY) for p in PROMPTS[:5]]
            all_submitted.set()
            outcomes = await asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
            return engine, outcomes, await engine.wait_closed()

    engine, outcomes, error = run(main())
    assert all(isinstance(o, GenerationError) for o in outcomes)
    assert engine.dead and "3 steps failed in a row" in str(error)


def test_a_submit_racing_the_worker_death_is_refused_not_lost(tiny_llm, monkeypatch):
    """The worker dies (and ends every queued request) between submit()'s first check and its
    queueing: the request is refused with EngineNotRunningError, not queued where nobody answers."""
    import glm4voice.llm.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_CONSECUTIVE_FAILURES", 1)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            fail_now = threading.Event()

            def prefill(*args, **kwargs):
                fail_now.wait()
                raise MemoryError("no memory")

            engine.runner.prefill = prefill
            doomed = engine.submit(PROMPTS[0], GREEDY)
            real_validate = engine._validate_prompt

            def validate(prompt_ids):  # runs after submit()'s running check, before the request is queued
                fail_now.set()
                engine._thread.join()  # the worker has died and ended everything it had
                return real_validate(prompt_ids)

            engine._validate_prompt = validate
            with pytest.raises(EngineNotRunningError, match="no memory"):
                engine.submit(PROMPTS[1], GREEDY)
            with pytest.raises(GenerationError, match="no memory"):
                await collect(doomed)
            return engine, await engine.wait_closed()

    engine, error = run(main())
    assert engine.dead and isinstance(error.__cause__, MemoryError)


def test_a_clean_stop_is_not_a_failure(tiny_llm):
    async def main():
        engine = Engine(tiny_llm, cpu_config(), stop_ids=())
        with pytest.raises(EngineNotRunningError):
            await engine.wait_closed()
        await engine.start()
        called = []
        engine.add_failure_callback(called.append)
        await engine.stop()
        return engine, await engine.wait_closed(), called

    engine, closed, called = run(main())
    assert closed is None and called == [] and not engine.dead and engine.failure is None


def test_long_prefill_is_chunked_between_decode_steps(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(prefill_chunk=16), stop_ids=()) as engine:
            runner = engine.runner
            trace = []
            real_prefill, real_launch = runner.prefill, runner.launch
            runner.prefill = lambda slot, ids, start, sample: (
                trace.append(("P", slot)) or real_prefill(slot, ids, start, sample)
            )
            runner.launch = lambda rows, after=None: trace.append(("D", len(rows))) or real_launch(rows, after)
            running = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=60))
            await running.__anext__()
            long_prompt = list(range(3000, 3160))  # 10 chunks of 16
            long = engine.submit(long_prompt, GREEDY)
            long_tokens, rest = await asyncio.gather(collect(long), collect(running))
            alone = await collect(engine.submit(long_prompt, GREEDY))
            return trace, long_tokens, alone

    trace, long_tokens, alone = run(main())
    long_chunks = [i for i, (kind, slot) in enumerate(trace) if kind == "P" and slot == 1]
    assert len(long_chunks) == 10
    between = trace[long_chunks[0] : long_chunks[-1]]
    assert sum(kind == "D" for kind, _ in between) >= 9  # the running stream advanced at every chunk
    assert long_tokens == alone


def test_stop_ends_running_streams(tiny_llm):
    async def main():
        engine = Engine(tiny_llm, cpu_config(), stop_ids=())
        await engine.start()
        stream = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=250))
        await stream.__anext__()
        await engine.stop()
        with pytest.raises(EngineStoppedError):
            await collect(stream)
        return stream

    assert run(main()).finish_reason is FinishReason.ERROR


def test_engine_from_folder_path_and_int8(llm_folder, tiny_llm):
    async def generate(config):
        async with Engine.from_pretrained(str(llm_folder), config, stop_ids=()) as engine:
            assert engine.model_config == tiny_llm.config
            return await collect(engine.submit(PROMPTS[4], GREEDY))

    async def reference():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            return await collect(engine.submit(PROMPTS[4], GREEDY))

    assert run(generate(cpu_config())) == run(reference())
    int8_tokens = run(generate(cpu_config(dtype="int8")))
    assert len(int8_tokens) == 20 and all(0 <= t < tiny_llm.config.vocab_size for t in int8_tokens)


@pytest.mark.parametrize("seq_length, expected", [(None, 256), (64, 64), (8192, 256)])
def test_start_logs_the_context_limit_and_why(tiny_llm, caplog, seq_length, expected):
    """config.json's seq_length caps max_seq_len; without one the configured value is used and the
    log says that the original would stop at 2048 positions."""
    import dataclasses
    import logging

    from glm4voice.llm.checkpoint import LoadedModel

    config = dataclasses.replace(tiny_llm.config, seq_length=seq_length)
    loaded = LoadedModel(tiny_llm.model, config, tiny_llm.stop_ids, tiny_llm.folder)

    async def main():
        async with Engine(loaded, cpu_config(max_seq_len=256), stop_ids=()) as engine:
            with pytest.raises(PromptTooLongError, match=f"at most {expected - 1} fit"):
                engine.submit([5] * expected, GREEDY)
            return engine.max_seq_len, engine.runner.cache.max_seq_len

    with caplog.at_level(logging.INFO, logger="glm4voice.llm.engine"):
        limits = run(main())
    assert limits == (expected, expected)
    record = next(r for r in caplog.records if "positions per stream" in r.getMessage())
    message = record.getMessage()
    assert f"context: {expected} positions per stream" in message
    if seq_length is None:
        assert "no seq_length" in message and "2048" in message and record.levelno == logging.INFO
    elif seq_length < 256:
        assert "seq_length is 64" in message and record.levelno == logging.WARNING
    else:
        assert "as configured" in message


def test_engine_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="max_unread_tokens"):
            EngineConfig(max_unread_tokens=bad)
    assert EngineConfig(max_unread_tokens=None).max_unread_tokens is None
    assert EngineConfig().max_unread_tokens == engine_module.MAX_UNREAD_TOKENS
    config = EngineConfig(device="cpu")
    assert not config.use_cuda_graphs() and not config.use_compile()
    assert EngineConfig(device="cpu", dtype="int8").activation_dtype() == torch.float32


def test_chained_decode_steps_continue_on_the_device(tiny_llm):
    from glm4voice.llm.runner import DecodeRow, ModelRunner

    runner = ModelRunner(tiny_llm.model, 4, 64, cuda_graphs=False, compile=False)
    prompts = {0: PROMPTS[0], 2: PROMPTS[2]}
    rows = []
    for slot, prompt in prompts.items():
        runner.set_sampling(slot, 0.0, 1.0, 0)
        rows.append(DecodeRow(slot, runner.prefill(slot, prompt, 0, sample=True), len(prompt)))
    first = [row.token for row in rows]
    a = runner.launch(rows)
    b = runner.launch(rows, after=a)  # launched before a is read
    got = [runner.collect(a)]
    c = runner.launch(rows, after=b)
    got += [runner.collect(b), runner.collect(c)]
    # then a synchronous step fed from the host's view of the rows
    got.append(runner.decode([DecodeRow(row.slot, got[-1][i], row.position + 3) for i, row in enumerate(rows)]))
    for i, prompt in enumerate(prompts.values()):
        assert [first[i]] + [step[i] for step in got] == greedy_reference(tiny_llm.model, prompt, 5)
    with pytest.raises(ValueError, match="at least one row"):
        runner.launch([])


def test_make_way_pauses_the_worker_until_its_caller_leaves(tiny_llm, monkeypatch):
    """Engine.make_way (the one-process layout decodes a turn's first audio block inside it): no step
    starts while the caller is inside (within the limit, here a minute), and the request goes on after."""
    monkeypatch.setattr(engine_module, "MAKE_WAY_LIMIT_S", 60.0)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            with engine.make_way():
                stream = engine.submit(PROMPTS[0], GREEDY)
                await until(lambda: engine.make_way_pauses == 1, "the worker did not pause")
                await asyncio.sleep(0.1)  # the worker has the request, and waits
                stats = engine.stats()
                assert (stats.prefill_chunks, stats.decode_steps) == (0, 0)
            return await collect(stream), engine.make_way_pauses

    tokens, pauses = run(main())
    assert len(tokens) == GREEDY.max_new_tokens and pauses == 1


def test_a_caller_that_stays_in_make_way_pauses_the_worker_once(tiny_llm, monkeypatch):
    """A caller that does not leave (a decoder call that hangs) delays generation by one limit, once:
    the worker does not pause again at every step for the same caller."""
    monkeypatch.setattr(engine_module, "MAKE_WAY_LIMIT_S", 0.2)

    async def main():
        async with Engine(tiny_llm, cpu_config(), stop_ids=()) as engine:
            with engine.make_way():
                tokens = await collect(engine.submit(PROMPTS[1], GREEDY))
                return tokens, engine.make_way_pauses

    tokens, pauses = run(main())
    assert len(tokens) == GREEDY.max_new_tokens and pauses == 1


SPARED = 8
"""``starting_tokens`` of the make_way tests below."""
LONGER = SamplingParams(temperature=0, max_new_tokens=120)


async def _past_spared(engine: Engine):
    """A request on PROMPTS[0] (LONGER) and the tokens read until it has more than SPARED."""
    stream = engine.submit(PROMPTS[0], LONGER)
    return stream, [await anext(stream) for _ in range(SPARED + 1)]


@pytest.mark.parametrize("arrives", ["before", "during"])
def test_make_way_lets_starting_requests_step_alone(tiny_llm, monkeypatch, arrives):
    """make_way(starting_tokens=K): while the caller is inside (within the limit, here a minute), a new
    request is prefilled and steps until it has K tokens, and a request already past K does not step
    (at most the steps already on the device finish); both then end with the tokens they would have
    had without the pause. The new request arrives before the pause, or while the worker pauses with
    no request starting."""
    monkeypatch.setattr(engine_module, "MAKE_WAY_LIMIT_S", 60.0)

    async def main():
        async with Engine(tiny_llm, cpu_config(max_unread_tokens=None), stop_ids=()) as engine:
            a, a_tokens = await _past_spared(engine)
            b = engine.submit(PROMPTS[3], GREEDY) if arrives == "before" else None
            with engine.make_way(starting_tokens=SPARED):
                before = engine.stats().tokens_generated
                if b is None:
                    await until(lambda: engine.make_way_pauses == 1, "the worker did not pause")
                    before = engine.stats().tokens_generated
                    b = engine.submit(PROMPTS[3], GREEDY)
                b_tokens = [await anext(b) for _ in range(SPARED)]  # a minute late if b paused too
                during = engine.stats().tokens_generated - before
                pauses = engine.make_way_pauses
            a_tokens += await collect(a)
            b_tokens += await collect(b)
            return a_tokens, b_tokens, during, pauses

    a_tokens, b_tokens, during, pauses = run(main())
    assert pauses == 1
    # b's tokens from `before` on (one more may be launched before its count is read) and a's last
    # steps launched before the pause began; a stepping along with b would add about SPARED more
    assert during <= SPARED + 1 + 3
    assert a_tokens == greedy_reference(tiny_llm.model, PROMPTS[0], LONGER.max_new_tokens)
    assert b_tokens == greedy_reference(tiny_llm.model, PROMPTS[3], GREEDY.max_new_tokens)


def test_a_starting_request_that_ends_during_a_make_way_pause_leaves_the_others_running(tiny_llm, monkeypatch):
    """A request spared by make_way(starting_tokens=K) that ends before K tokens (here its length) ends
    normally, and the paused request goes on after the pause with its own tokens."""
    monkeypatch.setattr(engine_module, "MAKE_WAY_LIMIT_S", 60.0)
    short = SamplingParams(temperature=0, max_new_tokens=3)

    async def main():
        async with Engine(tiny_llm, cpu_config(max_unread_tokens=None), stop_ids=()) as engine:
            a, a_tokens = await _past_spared(engine)
            b = engine.submit(PROMPTS[3], short)
            with engine.make_way(starting_tokens=SPARED):
                b_tokens = await collect(b)  # ends inside: a minute late if b paused too
            a_tokens += await collect(a)
            return a_tokens, b_tokens, engine.stats()

    a_tokens, b_tokens, stats = run(main())
    assert b_tokens == greedy_reference(tiny_llm.model, PROMPTS[3], short.max_new_tokens)
    assert a_tokens == greedy_reference(tiny_llm.model, PROMPTS[0], LONGER.max_new_tokens)
    assert stats.requests_failed == 0


def test_make_way_rejects_negative_starting_tokens(tiny_llm):
    engine = Engine(tiny_llm, cpu_config(), stop_ids=())
    with pytest.raises(ValueError, match="starting_tokens"):
        with engine.make_way(starting_tokens=-1):
            pass


def test_a_running_engine_lowers_the_thread_switch_interval_and_keeps_a_lower_one(tiny_llm):
    """The worker must get the GIL back soon after each step: start() lowers Python's switch interval
    to SWITCH_INTERVAL_S (from the 5 ms default), and leaves a smaller one alone."""
    before = sys.getswitchinterval()

    async def started(interval: float) -> float:
        sys.setswitchinterval(interval)
        async with Engine(tiny_llm, cpu_config(), stop_ids=()):
            return sys.getswitchinterval()

    try:
        assert run(started(0.005)) == pytest.approx(engine_module.SWITCH_INTERVAL_S)
        assert run(started(engine_module.SWITCH_INTERVAL_S / 2)) == pytest.approx(engine_module.SWITCH_INTERVAL_S / 2)
    finally:
        sys.setswitchinterval(before)


# --- backpressure --------------------------------------------------------------------------------------

LONG_GREEDY = SamplingParams(temperature=0, max_new_tokens=200)
"""Long enough that the event loop hears of the unread tokens long before the reply could end, however
the threads are scheduled (the hold is asked for when the loop takes the worker's tokens)."""


def test_a_stream_whose_consumer_stops_reading_is_held_and_resumes_where_it_was(tiny_llm):
    """max_unread_tokens=8: a stream nobody reads stops taking decode steps (other streams run on,
    whole) and, once its consumer reads again, goes on to the same greedy reply as a stream read at
    once."""

    async def main():
        async with Engine(tiny_llm, cpu_config(max_unread_tokens=8), stop_ids=()) as engine:
            unread = engine.submit(PROMPTS[1], LONG_GREEDY)
            assert len(await collect(engine.submit(PROMPTS[0], GREEDY))) == GREEDY.max_new_tokens
            await until(lambda: engine.stats().held_streams == 1, "the unread stream was not held")
            # every step from now on leaves it out: another whole reply does not move it
            assert len(await collect(engine.submit(PROMPTS[2], GREEDY))) == GREEDY.max_new_tokens
            held_at = unread.tokens_generated
            assert len(await collect(engine.submit(PROMPTS[3], GREEDY))) == GREEDY.max_new_tokens
            assert unread.tokens_generated == held_at < LONG_GREEDY.max_new_tokens
            late = await collect(unread)  # reading resumes it
            stats = engine.stats()
            alone = await collect(engine.submit(PROMPTS[1], LONG_GREEDY))
            return late, stats, alone, unread

    late, stats, alone, unread = run(main())
    assert late == alone and unread.finish_reason is FinishReason.LENGTH
    assert stats.holds >= 1 and stats.held_streams == 0


def test_a_held_stream_can_be_cancelled_and_is_ended_by_stop(tiny_llm):
    async def main():
        engine = Engine(tiny_llm, cpu_config(max_unread_tokens=4), stop_ids=())
        await engine.start()
        cancelled = engine.submit(PROMPTS[1], LONG_GREEDY)
        stopped = engine.submit(PROMPTS[2], LONG_GREEDY)
        await until(lambda: engine.stats().held_streams == 2, "the unread streams were not held")
        cancelled.cancel()
        assert await collect(cancelled) == [] and cancelled.finish_reason is FinishReason.CANCELLED
        await until(lambda: engine.stats().active_streams == 1, "the cancelled stream kept its slot")
        await engine.stop()
        with pytest.raises(EngineStoppedError):
            await collect(stopped)
        return stopped

    assert run(main()).finish_reason is FinishReason.ERROR


def test_without_a_limit_an_unread_stream_runs_to_its_end(tiny_llm):
    async def main():
        async with Engine(tiny_llm, cpu_config(max_unread_tokens=None), stop_ids=()) as engine:
            unread = engine.submit(PROMPTS[1], LONG_GREEDY)
            await engine.wait_idle()  # generated to the end without a reader
            return unread, engine.stats()

    unread, stats = run(main())
    assert unread.tokens_generated == LONG_GREEDY.max_new_tokens and stats.holds == 0
