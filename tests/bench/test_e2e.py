"""bench/e2e.py and its helpers: the realistic-load plan and figures, the forced answers' history
(so the engine's prefix cache sees real conversations), the records of a turn and of repeated runs,
and a CPU dry run of every new section (layouts, turns, concurrency with repeated runs, poisson)
whose JSON must hold the figures the issue asks for."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.e2e import combine_runs, layouts_summary, parse_args, parse_variants, question_variant, turn_record
from bench.e2e_load import (
    LoadShape,
    capacity,
    max_overlap,
    mean_overlap,
    percentile,
    plan_load,
    rate_figures,
    what_overlapped,
)
from bench.e2e_server import AnswerPattern, ForcedHistory, PatternStream, answer_length
from bench.e2e_trace import gpu_timeline, loop_lags
from glm4voice.audio import INPUT_SAMPLE_RATE, Audio
from glm4voice.pipeline.events import (
    AssistantAudio,
    BlockTiming,
    EndReason,
    InputAccepted,
    TurnFailed,
    TurnFinished,
    TurnTimings,
)
from glm4voice.protocol import InputMode

from support import ROOT

USER = 7
PATTERN = AnswerPattern(text_ids=(100, 101, 102), audio_offset=1000, num_audio_codes=50, end_id=USER)


# --- the realistic load --------------------------------------------------------------------------------


def test_poisson_plans_are_reproducible_and_have_the_asked_shape():
    shape = LoadShape(turns=3, spoken_fraction=0.7, think_mean_s=3.0, answer_mean_s=12.0)
    plans, warm_s = plan_load(1.0, 600.0, shape, seed=3)
    again, _ = plan_load(1.0, 600.0, shape, seed=3)
    assert plans == again and warm_s == pytest.approx(shape.cycle_s)
    arrivals = [p for p in plans if not p.in_progress]
    assert 480 < len(arrivals) < 720  # Poisson: 600 expected
    assert all(0 <= p.arrival_s < 600 for p in plans) and [p.arrival_s for p in plans] == sorted(
        p.arrival_s for p in plans
    )
    assert all(len(p.turns) == 3 for p in arrivals)
    in_progress = [p for p in plans if p.in_progress]  # the warm start: those under way at time 0
    assert all(p.since_s < 0 <= p.arrival_s and 1 <= len(p.turns) <= 3 for p in in_progress)
    assert all(0 <= p.turns[0].input_s <= shape.spoken_input_s for p in in_progress)
    assert any(p.turns[0].input_s < shape.typed_input_s for p in in_progress)  # inputs under way at 0
    turns = [t for p in plans for t in p.turns]
    spoken = sum(t.spoken for t in turns) / len(turns)
    assert 0.65 < spoken < 0.75
    assert all(6.0 <= t.answer_s <= 18.0 for t in turns)
    assert 2.5 < sum(t.think_s for t in turns) / len(turns) < 3.5
    assert len({t.seed for t in turns}) == len(turns)  # every turn its own seed
    cold, warm_cold = plan_load(1.0, 600.0, shape, seed=3, warm_start=False)
    assert not any(p.in_progress for p in cold) and warm_cold == pytest.approx(shape.lifetime_s)
    with pytest.raises(ValueError):
        plan_load(0, 10, shape)


def test_the_warm_start_is_steady_state_from_the_measured_window_on():
    """Averaged over seeds, turns start at rate x turns per second from time 0 on, and as many
    conversations are in progress at every point of the measured window as steady state holds
    (rate x lifetime): no burst of turns where the window starts."""
    shape, rate, window, seeds, bin_s = LoadShape(), 0.5, 70.0, 150, 5.0
    starts = [0] * int(window / bin_s)
    in_progress = [0] * int(window / bin_s)
    for seed in range(seeds):
        plans, warm_s = plan_load(rate, window, shape, seed=seed)
        for plan in plans:
            schedule = plan.schedule(shape.lead_s)
            for _, begins, _ in schedule:
                if begins < window:
                    starts[int(begins // bin_s)] += 1
            for k in range(len(in_progress)):  # in progress at the bin's middle
                in_progress[k] += plan.since_s <= (k + 0.5) * bin_s < schedule[-1][2]
    per_s = [n / seeds / bin_s for n in starts]
    assert all(abs(r - rate * shape.turns) < 0.1 * rate * shape.turns for r in per_s), per_s
    measured = [n / seeds for k, n in enumerate(in_progress) if k * bin_s >= warm_s]
    steady = rate * shape.lifetime_s
    assert all(abs(n - steady) < 0.1 * steady for n in measured), (measured, steady)


def test_rate_figures_count_the_measured_window_only():
    def turn(start, ttfa, spoken=True, underruns=0, failed=None, length=10.0, urgent=0):
        record = {"start_s": start, "spoken": spoken, "playback_end_s": start + length}
        if failed:
            return record | {"failed": failed}
        return record | {"ttfa": ttfa, "underruns": underruns, "token_rate": 20.0, "first_block_held": ttfa / 2,
                         "first_block_with_next": ttfa > 0.25, "block_path": [[0, start]], "urgent_blocks": urgent}  # fmt: skip

    turns = [turn(1.0, 9.0, urgent=5), turn(10.0, 0.2), turn(11.0, 0.3, spoken=False, urgent=1),
             turn(20.0, 0.4, underruns=2, urgent=2), turn(30.0, 0.6, failed="server_busy: busy"), turn(50.0, 9.0)]  # fmt: skip
    conversations = [(0.0, 40.0), (5.0, 25.0), (15.0, 45.0)]
    figures = rate_figures(1.5, turns, conversations, warm_s=10.0, window_s=40.0, tokens_in_window=3000)
    assert figures["turns"] == 4 and figures["turns_spoken"] == 3 and figures["turns_typed"] == 1
    assert figures["failed"] == 1 and figures["failures"] == ["server_busy: busy"]
    assert figures["ttfa_p50"] == 0.3 and figures["ttfa_p95"] == figures["ttfa_p99"] == 0.4
    assert figures["ttfa_typed_p95"] == 0.3 and figures["underruns"] == 2 and figures["turns_with_underrun"] == 1
    assert figures["token_rate_total"] == 100.0
    assert (
        figures["ttfa_parts_p50"]["first_block_held"] == 0.15 and figures["ttfa_parts_p95"]["first_block_held"] == 0.2
    )
    assert figures["ttfa_parts_p50"]["prefill"] is None  # a part no turn recorded
    assert figures["turns_first_block_with_next"] == 2  # of the measured turns that did not fail
    assert (figures["urgent_blocks"], figures["turns_with_urgent_blocks"]) == (
        3,
        2,
    )  # the turn at 1.0 s is not measured
    assert [t["first_block_with_next"] for t in figures["slowest_turns"]] == [True, True, False]
    assert [(t["start_s"], t["underruns"], t["block_path"]) for t in figures["dry_turns"]] == [(20.0, 2, [[0, 20.0]])]
    assert figures["mean_concurrent_conversations"] == pytest.approx((30 + 15 + 25) / 30, abs=0.05)
    assert figures["max_concurrent_answers"] == 2 and not figures["passes"]
    clean = rate_figures(1.0, [turn(12.0, 0.2), turn(13.0, 0.5)], conversations, 10.0, 40.0, None)
    assert clean["passes"] and clean["token_rate_total"] is None
    slow = rate_figures(2.0, [turn(12.0, 0.2), turn(13.0, 0.51)], conversations, 10.0, 40.0, None)
    assert not slow["passes"]
    result = capacity([clean | {"mean_concurrent_conversations": 40.0}, slow, figures])
    assert result["capacity_rate_per_s"] == 1.0 and result["capacity_conversations"] == 40.0
    assert capacity([slow])["capacity_conversations"] == 0 and capacity([slow])["capacity_rate_per_s"] is None


def test_a_slow_turn_lists_what_the_decoder_delivered_while_its_early_block_waited():
    """The slower of the first two blocks (here block 1: 0.5 s from hand-over to audio), or the block
    asked for (a dry turn's), and the other turns' blocks delivered in that time, on the run's clock;
    its own blocks and blocks outside the interval are left out."""
    slow = {"start_s": 10.0, "blocks_decoded": [[0, 10, 0.2, 0.3], [1, 16, 0.4, 0.9], [2, 26, 0.9, 1.1]]}
    other = {"start_s": 9.0, "blocks_decoded": [[3, 80, 1.0, 1.45], [4, 160, 1.45, 1.8], [5, 160, 1.8, 2.5]]}
    young = {"start_s": 10.3, "blocks_decoded": [[0, 10, 0.1, 0.55]]}
    found = what_overlapped(slow, [slow, other, young])
    assert found["slow_block"] == [1, 0.4, 0.5]
    assert found["decoded_meanwhile"] == [[0.05, 80, 3], [0.4, 160, 4], [0.45, 10, 0]]
    assert what_overlapped({"start_s": 1.0}, [other]) == {}  # a record without the blocks
    # the GPU's work meanwhile: entries overlapping [10.4, 10.9] on the run's clock, relative to 10.4
    timeline = {
        "decoder_calls": [[10.0, 10.3, 4], [10.35, 10.85, 3], [10.85, 11.0, 1]],
        "prefills": [[10.5, 10.6, 512]],
    }
    traced = what_overlapped(slow, [slow, other], timeline)
    assert traced["decoder_calls_meanwhile"] == [[-0.05, 0.45, 3], [0.45, 0.6, 1]]
    assert traced["prefills_meanwhile"] == [[0.1, 0.2, 512]]
    # a dry turn's block that ran dry, if given: block 2, [10.9, 11.1] on the run's clock
    dry = what_overlapped(slow, [slow, other], timeline, block=2)
    assert dry["slow_block"] == [2, 0.9, 0.2] and dry["decoded_meanwhile"] == []
    assert dry["decoder_calls_meanwhile"] == [[-0.05, 0.1, 1]] and dry["prefills_meanwhile"] == []
    # a block not decoded (the tail, index None) or none given: the slower early block, as above
    assert what_overlapped(slow, [slow, other], block=None)["slow_block"] == [1, 0.4, 0.5]


def test_the_gpu_timeline_records_each_call_and_takes_its_wrapper_off():
    """Each feed_many, finish and prefill call while recording, with its size, on the given clock; the
    instances' own methods afterwards (and a second recorder on the same method is refused)."""

    class Decoder:
        def feed_many(self, jobs, on_result=None):
            return [len(jobs)]

        def finish(self, stream):
            stream.pending = []  # consumed: the size is taken before the call

    class Runner:
        def prefill(self, slot, ids, start, sample):
            return len(ids) if sample else None

    decoder, runner = Decoder(), Runner()
    with gpu_timeline(decoder, runner, t0=time.monotonic()) as timeline:
        assert decoder.feed_many([1, 2, 3]) == [3]
        assert runner.prefill(0, [5] * 7, 0, sample=True) == 7
        runner.prefill(0, ids=[5] * 2, start=7, sample=False)
        decoder.finish(argparse.Namespace(pending=[1, 2, 3, 4]))
        with pytest.raises(RuntimeError, match="already wrapped"), gpu_timeline(decoder, None, t0=0.0):
            pass
    assert [call[2] for call in timeline["decoder_calls"]] == [3]
    assert [call[2] for call in timeline["prefills"]] == [7, 2]
    assert [call[2] for call in timeline["finishes"]] == [4]
    assert all(0 <= start <= end for start, end, _ in timeline["decoder_calls"] + timeline["prefills"])
    assert not {"feed_many", "finish"} & set(vars(decoder)) and "prefill" not in vars(runner)
    decoder.feed_many([1])  # no longer recorded
    assert len(timeline["decoder_calls"]) == 1


def test_the_loop_probe_records_a_blocked_event_loop():
    """A loop blocked for 60 ms while the probe sleeps: one wake-up at least 50 ms late, recorded
    with its interval on the given clock (a busy machine only makes it later)."""

    async def main() -> list[list[float]]:
        loop = asyncio.get_running_loop()
        done, lags = asyncio.Event(), []
        probe = asyncio.create_task(loop_lags(loop.time(), done, lags))
        await asyncio.sleep(0)  # the probe is asleep
        time.sleep(0.06)  # noqa: ASYNC251 - the loop is blocked on purpose
        done.set()
        await probe
        return lags

    lags = asyncio.run(main())
    assert any(late >= 50 and woke - asked >= 0.05 for asked, woke, late in lags), lags


def test_percentiles_and_overlaps():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile(values, 0) == 1 and percentile([], 50) is None
    assert percentile([None, 2.0], 50) == 2.0
    assert mean_overlap([(0, 10), (5, 15)], 0, 10) == 1.5 and mean_overlap([], 0, 10) == 0.0
    assert max_overlap([(0, 10), (5, 15), (10, 12)], 0, 20) == 2


# --- forced answers and the prefix cache -----------------------------------------------------------------


class FakeEngineStream:
    def __init__(self, ids):
        self.ids = list(ids)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.ids:
            raise StopAsyncIteration
        return self.ids.pop(0)

    def cancel(self):
        self.cancelled = True


def test_the_engine_sees_its_own_ids_for_a_conversations_history():
    """Turn 2's prompt holds turn 1's forced answer; the engine computed (and cached) its own sampled
    ids there: the history is mapped back, so turn 2 reuses the cache as in production."""

    async def scenario():
        history = ForcedHistory(USER)
        prompt1 = [1, 2, USER, 3, 4]
        engine_prompt1 = history.to_engine(prompt1)
        length = answer_length(4)
        stream = PatternStream(FakeEngineStream(range(500, 500 + length)), PATTERN, length, 0, history,
                               prompt1, engine_prompt1)  # fmt: skip
        forced = [token async for token in stream]
        assert forced[-1] == USER and len(forced) == length
        reply = forced[:-1]  # what the pipeline keeps: the answer without its end-of-turn id
        prompt2 = prompt1 + reply + [USER, 5, 6]
        engine_prompt2 = history.to_engine(prompt2)
        assert engine_prompt2 == prompt1 + list(range(500, 500 + length - 1)) + [USER, 5, 6]
        # a third turn goes through both mappings
        stream = PatternStream(FakeEngineStream(range(900, 900 + length)), PATTERN, length, 1, history,
                               prompt2, engine_prompt2)  # fmt: skip
        reply2 = [token async for token in stream][:-1]
        engine_prompt3 = history.to_engine(prompt2 + reply2 + [USER, 8])
        assert engine_prompt3 == engine_prompt2 + list(range(900, 900 + length - 1)) + [USER, 8]
        assert history.to_engine([9, USER, 1]) == [9, USER, 1]  # unknown histories pass unchanged

    asyncio.run(scenario())
    small = ForcedHistory(USER, entries=2)
    for i in range(3):
        small.remember([i], [i + 10])
    assert small.to_engine([0, USER]) == [0, USER] and small.to_engine([2, USER]) == [12, USER]


def test_question_variants_differ_and_keep_the_length():
    samples = np.sin(np.arange(INPUT_SAMPLE_RATE * 2) / 7).astype(np.float32)
    question = Audio(samples, INPUT_SAMPLE_RATE)
    variants = [question_variant(question, i).samples for i in range(1, 5)]
    assert all(len(v) == len(samples) for v in variants)
    assert all(not np.array_equal(a, b) for a, b in zip(variants, variants[1:]))


# --- records -------------------------------------------------------------------------------------------


def _finished(chunk_times: list[float], chunk_s: float = 0.5, blocks: tuple = ()) -> list:
    rate = 22050
    chunks = [AssistantAudio(np.zeros(int(chunk_s * rate), np.float32), rate, int(i * chunk_s * rate), i, t)
              for i, t in enumerate(chunk_times)]  # fmt: skip
    timings = TurnTimings(input_loaded=0.01, speech_tokenized=0.03, request_sent=0.031, first_token=0.05,
                          first_block_ready=0.2, first_audio=chunk_times[0], last_token=1.0, tokens=30,
                          blocks=blocks)  # fmt: skip
    audio = np.zeros(int(chunk_s * rate) * len(chunks), np.float32)
    end = TurnFinished("", audio, rate, EndReason.USER, (), 10, 20, 0, timings, chunk_times[-1] + 0.1)
    return [InputAccepted(InputMode.AUDIO, 80, 63, 5.0, 0.03), *chunks, end]


def test_a_turn_record_has_its_playback_end_and_underruns():
    steady = turn_record(_finished([0.25, 0.5, 0.9]), lead=0.15)
    assert steady["ttfa"] == 0.25 and steady["underruns"] == 0 and steady["prompt_tokens"] == 80
    assert steady["playback_end_s"] == pytest.approx(0.25 + 0.15 + 1.5)
    late = turn_record(_finished([0.25, 0.5, 2.0]), lead=0.15)  # the third chunk is due at 1.4 s
    assert late["underruns"] == 1 and late["playback_end_s"] == pytest.approx(2.0 + 0.5)
    failed = turn_record([TurnFailed(kind_of("server_busy"), "busy", "", TurnTimings(), 0.2)], lead=0.15)
    assert failed["failed"].startswith("server_busy") and "ttfa" not in failed


def test_a_turn_record_says_whether_the_listener_started_with_the_next_block():
    first = BlockTiming(0, 10, ready=0.2, decode_started=0.2, decoded=0.25, samples=100)
    alone = turn_record(_finished([0.25], blocks=(first, BlockTiming(1, 16, 0.5, 0.5, 0.6, 100))), lead=0.15)
    assert not alone["first_block_with_next"] and alone["first_block_held"] == 0.0
    assert alone["first_block_call"] == pytest.approx(0.05) and alone["first_audio_kept"] == 0.0
    assert alone["urgent_blocks"] == 0
    third = BlockTiming(2, 26, 1.5, 1.5, 1.6, 100, urgent=True)  # sent with the first blocks: its listener was short
    assert (
        turn_record(_finished([0.25], blocks=(first, BlockTiming(1, 16, 0.5, 0.5, 0.6, 100), third)), lead=0.15)[
            "urgent_blocks"
        ]
        == 1
    )
    # held back by the pacing, then decoded in the next block's job; both sent when the second was decoded
    held_first = BlockTiming(0, 10, ready=0.2, decode_started=0.5, decoded=0.6, samples=100, sent=0.7)
    second = BlockTiming(1, 16, 0.5, 0.5, 0.7, 100, sent=0.7)
    held = turn_record(_finished([0.7], blocks=(held_first, second)), lead=0.15)
    assert held["first_block_with_next"] and held["first_block_held"] == pytest.approx(0.3)
    assert held["block_path"] == [[0, 0.2, 0.5, 0.6, 0.7], [1, 0.5, 0.5, 0.7, 0.7]]  # cut, handed over, decoded, sent
    assert held["blocks_decoded"] == [[0, 10, 0.5, 0.6], [1, 16, 0.5, 0.7]]  # every block: size, handed over, decoded
    assert held["first_block_call"] == pytest.approx(0.1) and held["first_audio_kept"] == pytest.approx(0.1)
    # decoded at once, its audio kept back until the second block was decoded
    early_first = BlockTiming(0, 10, ready=0.2, decode_started=0.2, decoded=0.25, samples=100, sent=0.7)
    early = turn_record(_finished([0.7], blocks=(early_first, second)), lead=0.15)
    assert early["first_block_with_next"] and early["first_block_held"] == 0.0
    assert early["first_audio_kept"] == pytest.approx(0.45)
    assert not turn_record(_finished([0.25], blocks=(first,)), lead=0.15)["first_block_with_next"]  # one block


def kind_of(value: str):
    from glm4voice.pipeline.events import FailureKind

    return FailureKind(value)


def test_repeated_runs_keep_each_runs_underruns_and_the_worst():
    def run(underruns, with_underrun, rate):
        return {"conversations": 64, "wall_s": 35.0, "failed": 0, "underruns": underruns, "with_underrun": with_underrun,
                "all_real_time": underruns == 0, "ttfa_p50": 0.3, "ttfa_max": 0.6, "token_rate_min": rate,
                "min_slack_s": 0.05}  # fmt: skip

    level = combine_runs([run(0, 0, 40.0), run(3, 2, 35.0), run(0, 0, 41.0)])
    assert level["runs"] == 3 and level["real_time_runs"] == 2 and not level["all_real_time"]
    assert level["underruns_per_run"] == [0, 3, 0] and level["with_underrun"] == 2 and level["token_rate_min"] == 35.0
    assert [r["underruns"] for r in level["per_run"]] == [0, 3, 0]
    single = combine_runs([run(0, 0, 40.0)])
    assert single["all_real_time"] and "per_run" not in single
    summary = layouts_summary({"one-process": {"ttfa_p50": 0.19, "ttfa_p95": 0.21},
                               "two-process": {"ttfa_p50": 0.28, "ttfa_p95": 0.30}})  # fmt: skip
    assert summary["ttfa_p50_one_minus_two_process_s"] == pytest.approx(-0.09)


def test_variants_name_pipeline_settings_with_their_types():
    assert parse_variants("rate56:min_token_rate=56.25; b16:decode_batch=16;fixed:adaptive_blocks=off") == [
        ("rate56", {"min_token_rate": 56.25}), ("b16", {"decode_batch": 16}), ("fixed", {"adaptive_blocks": False})]  # fmt: skip
    for bad in ("nofield:colour=3", "b0:decode_batch=0", "no settings", "9x:decode_batch=2", "r:min_token_rate=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variants(bad)
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--variants", "b0:decode_batch=0"])
    # --pipeline: the same settings, in place of the defaults for every section
    base = parse_args(["--device", "cpu", "--pipeline", "cover_start=1, spare_max_turns=4"]).pipeline
    assert base == {"cover_start": True, "spare_max_turns": 4} and parse_args(["--device", "cpu"]).pipeline == {}
    for bad in ("colour=3", "spare_max_turns=-1", "decode_batch=x"):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", "--pipeline", bad])


def test_sections_are_checked():
    args = parse_args(["--sections", "layouts,poisson", "--device", "cpu"])
    assert args.sections == ("layouts", "poisson") and args.llm_device == "cpu" and args.llm_dtype == "float32"
    with pytest.raises(SystemExit):
        parse_args(["--sections", "layouts,nonsense", "--device", "cpu"])


def test_a_quantization_method_reaches_the_benchmarks_token_server():
    from bench.e2e_tokens import server_args

    args = parse_args(["--device", "cpu", "--llm-dtype", "int8", "--llm-quant-method", "torchao"])
    options = server_args(args, Path("tokenizer"), 1234, 4)
    assert (options.dtype, options.quant_method) == ("int8", "torchao")
    assert parse_args(["--device", "cpu"]).llm_quant_method is None
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--llm-quant-method", "torchao"])  # a float dtype has no method


# --- the dry run ---------------------------------------------------------------------------------------

NEW_SECTIONS = ("layouts", "turns", "concurrency", "poisson")
DRY_RUN_S = 1500
"""The dry run's limit. It takes minutes on an idle 2-core machine and can pass pytest's per-test timeout
(600 s) beside other work, so the test that builds it gets this limit instead."""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    command = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--device", "cpu", "--config", "small", "--quick",
               "--sections", ",".join(NEW_SECTIONS), "--levels", "2", "--all-at-once-runs", "2",
               "--variants", "one_at_a_time:decode_batch=1",
               "--budget-s", "3000", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=DRY_RUN_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(DRY_RUN_S + 60)
@pytest.mark.parametrize("section", NEW_SECTIONS)
def test_the_dry_run_of_each_new_section_writes_its_figures(dry_run, section):
    no_errors = {name: value for name, value in dry_run.items() if isinstance(value, dict) and "error" in value}
    assert not no_errors, no_errors
    assert dry_run["machine"]["layout"] == "one-process"
    if section == "layouts":
        layouts = dry_run["layouts"]
        for layout in ("one-process", "two-process"):
            figures = layouts[layout]
            assert figures["turns"] == 2 and figures["failed"] == 0
            assert figures["ttfa_p50"] > 0 and figures["ttfa_p95"] >= figures["ttfa_p50"]
            assert figures["first_block_while_generating"]["tokens_streamed_meanwhile"] >= 20
            assert "prefix_tokens_reused_per_turn" in figures
        # one process: each turn's first block decoded inside the engine's make_way (no such call over HTTP),
        # and the block handed over with it when the turn held its first block back (the listener waits for both),
        # and each urgent later block (its listener short of audio: how often depends on the machine's speed)
        one_process = layouts["one-process"]
        assert 2 <= one_process["make_way_calls"] <= 4 + one_process["urgent_blocks"]
        assert "make_way_calls" not in layouts["two-process"]
        assert "ttfa_p50_one_minus_two_process_s" in layouts
    elif section == "turns":
        turns = dry_run["turns"]
        assert turns["conversations"] == 1 and turns["history_ok"]
        assert turns["history_tokens_at_turn_5_min"] >= turns["history_target"]
        assert turns["ttfa_p50_first_s"] > 0 and turns["ttfa_p50_fifth_s"] > 0
        assert "fifth_minus_first_p50_s" in turns and "within_15_ms" in turns
        # the 5th turn starts from its whole history in the engine's cache (the forced ids mapped back)
        assert turns["prefix_tokens_reused_turn_5_min"] >= turns["history_tokens_at_turn_5_min"] - 1
    elif section == "concurrency":
        level = dry_run["concurrency_2"]
        assert level["runs"] == 2 and len(level["underruns_per_run"]) == 2 and len(level["per_run"]) == 2
        assert {"all_real_time", "real_time_runs", "ttfa_p50", "token_rate_min"} <= set(level)
        assert dry_run["concurrency"]["runs"] == 2
        for run in level["per_run"]:  # the decoder's batches: what they decoded, how full their graphs were
            assert run["decoder"]["batches"] >= 1 and run["decoder"]["mean_block_tokens"] >= 1
        variant = dry_run["concurrency_2_one_at_a_time"]
        assert variant["changes"] == {"decode_batch": 1} and variant["runs"] == 2
        assert all(run["decoder"]["mean_batch"] == 1 for run in variant["per_run"])
    else:
        rate = dry_run["poisson_0.3"]
        assert rate["turns"] >= 1 and rate["conversations"] >= 1
        for key in ("ttfa_p50", "ttfa_p95", "ttfa_p99", "underruns", "token_rate_total", "token_rate_p50",
                    "mean_concurrent_conversations", "passes"):  # fmt: skip
            assert key in rate, key
        assert rate["decoder"]["busy_share"] >= 0 and "mean_batch" in rate["decoder"]
        # this rate's own counts: no block cut in, no finish queued (both off by default), calls that
        # ended early for first blocks, held first blocks among its turns
        assert rate["first_blocks_cut_in"] == rate["finishes_queued"] == 0 and rate["later_calls_yielded"] >= 0
        assert 0 <= rate["turns_first_block_with_next"] <= rate["turns"]
        summary = dry_run["poisson"]
        assert summary["rates_per_s"] == [0.3] and "capacity_conversations" in summary and "meets_target" in summary
