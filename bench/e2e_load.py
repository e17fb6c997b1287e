"""Realistic load for bench/e2e.py's ``poisson`` section: who arrives when and says what (planning),
and what a rate's turns add up to (figures). Pure functions of their inputs (no clock, no model):
the benchmark runs the plans against the pipeline and hands the records back here.

The model of a user: a conversation starts when its user starts speaking (or typing) the first
question; each turn starts at the end of that input (the turn's TTFA clock starts there), its answer
plays in the browser's player, and the user thinks for a while after the answer has played before
starting the next input. Conversations arrive as a Poisson process of ``rate_per_s``; each has
``turns`` turns, spoken with probability ``spoken_fraction`` (else typed), answers of
``answer_mean_s`` seconds on average (uniform in :data:`ANSWER_SPREAD` times that) and exponential
think times.

Warm start: so that a rate is measured in steady state without first waiting one conversation
lifetime, the plan also holds the conversations that would be in progress at time 0. They are drawn
as the same Poisson process run over the :data:`WARM_HISTORY_LIFETIMES` lifetimes before time 0,
each walked through its planned inputs, answers and think times: a conversation keeps the turns
that start at time 0 or later, the first of them with only the rest of its input left (an input
under way at time 0), and is dropped if none is left. Turns then start at ``rate x turns`` per
second from time 0 on, as they do in steady state; the answers that were playing at time 0 are
missing, so the measured window starts one turn cycle later (or one longest answer, if longer).
Figures count only turns that start in the measured window ``[warm_s, window_s]``, and the mean
number of conversations in progress over that window.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

TYPED_QUESTIONS = (
    "What is the weather like in Paris in spring?",
    "Tell me a short story about a curious little cat.",
    "How do I make a good cup of tea?",
    "Can you recommend a book for a long train ride?",
    "What should I see on a weekend in Beijing?",
    "Explain how a rainbow forms, please.",
)
"""What typed turns say (one after the other)."""
TTFA_P95_LIMIT_S = 0.5
"""A rate passes if the TTFA p95 of its turns is at most this, with no underrun and no failure."""
SLOWEST_TURNS = 6
"""Turns whose TTFA parts each rate's figures list (the slowest: the tail that sets p95)."""
MEANWHILE_BLOCKS = 24
"""Most of the other turns' blocks listed per slow turn (:func:`what_overlapped`)."""
ANSWER_SPREAD = (0.5, 1.5)
"""An answer lasts a uniform draw in this range times :attr:`LoadShape.answer_mean_s`."""
WARM_HISTORY_LIFETIMES = 2.0
"""How far back (in mean conversation lifetimes) the warm start draws the conversations under way at
time 0: far enough that none arriving earlier would still be going on."""
TTFA_PARTS = ("prefill", "tokens_to_first_block", "first_block_held", "first_block_call", "first_audio_kept")
"""Parts of a turn's TTFA (``bench/e2e.turn_record``) whose p50 and p95 each rate reports: the engine's
prefill (queueing included), generating up to the first block, the first block held back by the turn's
pacing, its decoder call (waiting for a running call included), and its audio kept back until later
blocks were decoded (the listener starts with them)."""


@dataclass(frozen=True)
class LoadShape:
    turns: int = 3
    spoken_fraction: float = 0.7
    think_mean_s: float = 3.0
    answer_mean_s: float = 12.0
    spoken_input_s: float = 5.0
    """How long a spoken question takes to say (the benchmark's recording)."""
    typed_input_s: float = 4.0
    lead_s: float = 0.15
    """The player's start lead (glm4voice.defaults.PLAYER_LEAD_S)."""

    def __post_init__(self) -> None:
        if self.turns < 1 or not 0 <= self.spoken_fraction <= 1 or self.think_mean_s < 0 or self.answer_mean_s <= 0:
            raise ValueError(f"invalid load shape {self}")

    @property
    def input_mean_s(self) -> float:
        return self.spoken_fraction * self.spoken_input_s + (1 - self.spoken_fraction) * self.typed_input_s

    @property
    def cycle_s(self) -> float:
        """Mean length of one turn cycle: input, answer (with the player's lead), think time."""
        return self.input_mean_s + self.lead_s + self.answer_mean_s + self.think_mean_s

    @property
    def lifetime_s(self) -> float:
        """Mean length of a conversation (no think time after its last answer)."""
        return self.turns * self.cycle_s - self.think_mean_s


@dataclass(frozen=True)
class TurnPlan:
    spoken: bool
    input_s: float
    """The user speaks (or types) this long; the turn starts at the end."""
    answer_s: float
    """Seconds of speech in the answer (the benchmark forces its length)."""
    think_s: float
    """After the answer has played, before the user starts the next input."""
    seed: int
    variant: int
    """Which variant of the spoken question, or which typed question (so that prompts differ)."""


@dataclass(frozen=True)
class ConversationPlan:
    arrival_s: float
    """When the user starts the first input."""
    turns: tuple[TurnPlan, ...]
    in_progress: bool = False
    """Already going on at time 0 (warm start): ``arrival_s`` is then when its next input starts (or
    0, that input under way) and ``began_s`` when it arrived."""
    began_s: float | None = None
    """When the conversation began, if before ``arrival_s`` (a conversation under way at time 0)."""

    @property
    def since_s(self) -> float:
        """When the conversation began (it counts as in progress from then on)."""
        return self.arrival_s if self.began_s is None else self.began_s

    def schedule(self, lead_s: float) -> list[tuple[float, float, float]]:
        """Each turn's planned (input start, turn start, end of its answer's playback): answers as long
        as planned after the player's ``lead_s``, no TTFA."""
        out, start = [], self.arrival_s
        for turn in self.turns:
            begins = start + turn.input_s
            ends = begins + lead_s + turn.answer_s
            out.append((start, begins, ends))
            start = ends + turn.think_s
        return out


def _under_way(plan: ConversationPlan, lead_s: float) -> ConversationPlan | None:
    """What is left at time 0 of ``plan``, a conversation that arrived before it: the turns that start
    at 0 or later (the first one's input maybe under way), or None if none is left."""
    for index, (input_start, begins, _) in enumerate(plan.schedule(lead_s)):
        if begins >= 0:
            first = plan.turns[index] if input_start >= 0 else replace(plan.turns[index], input_s=begins)
            left = (first, *plan.turns[index + 1 :])
            return ConversationPlan(max(input_start, 0.0), left, in_progress=True, began_s=plan.arrival_s)
    return None


def plan_load(rate_per_s: float, window_s: float, shape: LoadShape, seed: int = 0, warm_start: bool = True):
    """The conversations of one rate: ``(plans, warm_s)``, plans sorted by arrival, ``warm_s`` the start
    of the measured window (one turn cycle with a warm start, or the longest answer if longer; one
    lifetime without)."""
    if rate_per_s <= 0 or window_s <= 0:
        raise ValueError("rate and window must be positive")
    rng = random.Random(seed)
    counter = iter(range(10**9))

    def turns(count: int) -> tuple[TurnPlan, ...]:
        out = []
        for _ in range(count):
            spoken = rng.random() < shape.spoken_fraction
            out.append(
                TurnPlan(
                    spoken=spoken,
                    input_s=shape.spoken_input_s if spoken else shape.typed_input_s,
                    answer_s=shape.answer_mean_s * rng.uniform(*ANSWER_SPREAD),
                    think_s=rng.expovariate(1 / shape.think_mean_s) if shape.think_mean_s > 0 else 0.0,
                    seed=next(counter),
                    variant=rng.randrange(1 << 30),
                )
            )
        return tuple(out)

    plans = []
    t = -WARM_HISTORY_LIFETIMES * shape.lifetime_s if warm_start else 0.0
    t += rng.expovariate(rate_per_s)
    while t < window_s:
        plan = ConversationPlan(t, turns(shape.turns))
        if t >= 0:
            plans.append(plan)
        elif (under_way := _under_way(plan, shape.lead_s)) is not None:
            plans.append(under_way)
        t += rng.expovariate(rate_per_s)
    longest_answer = shape.lead_s + ANSWER_SPREAD[1] * shape.answer_mean_s
    warm_s = min(max(shape.cycle_s, longest_answer) if warm_start else shape.lifetime_s, window_s / 2)
    return sorted(plans, key=lambda p: p.arrival_s), warm_s


# --- figures ----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float, digits: int = 4) -> float | None:
    """The ``q``-th percentile (0-100) by the nearest-rank method (None without values)."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], digits)


def mean_overlap(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Mean number of ``intervals`` covering a point of ``[start, end]`` (time-weighted)."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    return covered / (end - start)


def max_overlap(intervals: Sequence[tuple[float, float]], start: float, end: float) -> int:
    """Most ``intervals`` covering one point of ``[start, end]``."""
    edges = []
    for a, b in intervals:
        a, b = max(a, start), min(b, end)
        if b > a:
            edges += [(a, 1), (b, -1)]
    level = best = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        level += step
        best = max(best, level)
    return best


def rate_figures(
    rate_per_s: float,
    turns: Sequence[dict],
    conversations: Sequence[tuple[float, float]],
    warm_s: float,
    window_s: float,
    tokens_in_window: int | None,
    passes: Callable[[dict], bool] | None = None,
    timeline: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> dict:
    """One rate's figures from its turn records (``bench/e2e.turn_record`` plus ``start_s``, ``spoken``,
    ``playback_end_s``: seconds from the run's start) and conversation intervals (arrival, end of the
    last answer's playback). Only turns starting in ``[warm_s, window_s]`` count. ``timeline``: the
    GPU work recorded meanwhile (``bench/e2e_trace.gpu_timeline``), shown beside the slow turns."""
    measured = [t for t in turns if warm_s <= t["start_s"] <= window_s]
    ok = [t for t in measured if "failed" not in t]
    ttfas = [t["ttfa"] for t in ok if t.get("ttfa") is not None]
    answers = [(t["start_s"], t["playback_end_s"]) for t in turns if t.get("playback_end_s") is not None]
    span = window_s - warm_s
    figures = {
        "rate_per_s": rate_per_s,
        "window_s": [round(warm_s, 1), round(window_s, 1)],
        "conversations": len(conversations),
        "turns": len(measured),
        "turns_spoken": sum(1 for t in measured if t["spoken"]),
        "turns_typed": sum(1 for t in measured if not t["spoken"]),
        "failed": len(measured) - len(ok),
        "failures": sorted({t["failed"] for t in measured if "failed" in t})[:3],
        "ttfa_p50": percentile(ttfas, 50),
        "ttfa_p95": percentile(ttfas, 95),
        "ttfa_p99": percentile(ttfas, 99),
        "ttfa_max": percentile(ttfas, 100),
        "ttfa_spoken_p95": percentile([t["ttfa"] for t in ok if t["spoken"] and t.get("ttfa") is not None], 95),
        "ttfa_typed_p95": percentile([t["ttfa"] for t in ok if not t["spoken"] and t.get("ttfa") is not None], 95),
        "ttfa_parts_p50": {key: percentile([t.get(key) for t in ok], 50) for key in TTFA_PARTS},
        "ttfa_parts_p95": {key: percentile([t.get(key) for t in ok], 95) for key in TTFA_PARTS},
        "turns_first_block_with_next": sum(1 for t in ok if t.get("first_block_with_next")),
        "urgent_blocks": sum(t.get("urgent_blocks", 0) for t in ok),
        "turns_with_urgent_blocks": sum(1 for t in ok if t.get("urgent_blocks")),
        "underruns": sum(t["underruns"] for t in ok),
        "turns_with_underrun": sum(1 for t in ok if t["underruns"]),
        "token_rate_total": round(tokens_in_window / span, 1) if tokens_in_window is not None and span > 0 else None,
        "token_rate_p50": percentile([t["token_rate"] for t in ok if t.get("token_rate")], 50),
        "token_rate_min": percentile([t["token_rate"] for t in ok if t.get("token_rate")], 0),
        "mean_concurrent_conversations": round(mean_overlap(conversations, warm_s, window_s), 1),
        "mean_concurrent_answers": round(mean_overlap(answers, warm_s, window_s), 1),
        "max_concurrent_answers": max_overlap(answers, warm_s, window_s),
        "dry_turns": [  # where listeners ran dry: (block, seconds into the answer) of the first gap, and
            # what the decoder did while that block waited (the early blocks' if it was the tail)
            {
                key: t.get(key)
                for key in ("start_s", "ttfa", "first_underrun", "underruns", "first_block_with_next", "urgent_blocks")
            }
            | {"blocks": t.get("blocks", [])[:5], "block_path": t.get("block_path")}
            | what_overlapped(t, turns, timeline, block=(t.get("first_underrun") or [None])[0])
            for t in sorted((t for t in ok if t["underruns"]), key=lambda t: t["start_s"])[:SLOWEST_TURNS]
        ],
        "slowest_turns": [  # where the tail's time went
            {key: t.get(key) for key in ("start_s", "ttfa", *TTFA_PARTS, "first_block_with_next")}
            | {"blocks": t.get("blocks", [])[:2]}
            | what_overlapped(t, turns, timeline)
            for t in sorted(ok, key=lambda t: -(t.get("ttfa") or 0))[:SLOWEST_TURNS]
        ],
    }
    figures["passes"] = (passes or default_pass)(figures)
    return figures


def what_overlapped(
    turn: dict,
    turns: Sequence[dict],
    timeline: Mapping[str, Sequence[Sequence[float]]] | None = None,
    block: int | None = None,
) -> dict:
    """What the decoder did while one of ``turn``'s blocks waited for it and was decoded (its
    ``blocks_decoded``, from ``bench/e2e.turn_record``): block ``block`` if given and decoded (a dry
    turn's first block to run dry), else the slower of the first two. ``slow_block`` [index, seconds
    into the turn it was handed over, seconds until decoded], and ``decoded_meanwhile``, the other
    turns' blocks delivered in that time, [seconds after the hand-over, audio tokens, block index], in
    order (blocks of one decoder call arrive together), at most :data:`MEANWHILE_BLOCKS` of them. With a ``timeline``
    (lists of ``[start, end, size]`` on the run's clock), each of its lists too, as ``<name>_meanwhile``:
    the entries overlapping that time, [start, end] after the hand-over and their size. Empty without
    the record."""
    decoded_blocks = turn.get("blocks_decoded") or []
    chosen = [b for b in decoded_blocks if b[0] == block] or [b for b in decoded_blocks if b[0] in (0, 1)]
    if not chosen:
        return {}
    index, _, handed, decoded = max(chosen, key=lambda b: b[3] - b[2])
    start, end = turn["start_s"] + handed, turn["start_s"] + decoded
    meanwhile = sorted(
        [round(other["start_s"] + at - start, 4), codes, other_index]
        for other in turns
        if other is not turn
        for other_index, codes, _, at in other.get("blocks_decoded") or []
        if start <= other["start_s"] + at <= end
    )
    found = {
        "slow_block": [index, handed, round(decoded - handed, 4)],
        "decoded_meanwhile": meanwhile[:MEANWHILE_BLOCKS],
    }
    for name, entries in (timeline or {}).items():
        overlapping = sorted(
            [round(begin - start, 4), round(finish - start, 4), size]
            for begin, finish, size in entries
            if begin <= end and finish >= start
        )
        found[f"{name}_meanwhile"] = overlapping[:MEANWHILE_BLOCKS]
    return found


def default_pass(figures: dict) -> bool:
    """TTFA p95 within :data:`TTFA_P95_LIMIT_S`, no underrun, no failed turn, and turns measured."""
    p95 = figures["ttfa_p95"]
    fast = p95 is not None and p95 <= TTFA_P95_LIMIT_S
    return bool(figures["turns"]) and fast and not figures["underruns"] and not figures["failed"]


def capacity(rates: Sequence[dict]) -> dict:
    """The highest passing rate and its mean concurrent conversations (the capacity figure)."""
    passing = [r for r in rates if r.get("passes")]
    best = max(passing, key=lambda r: r["rate_per_s"], default=None)
    return {
        "rates_per_s": [r["rate_per_s"] for r in rates],
        "passing_rates_per_s": [r["rate_per_s"] for r in passing],
        "capacity_rate_per_s": best["rate_per_s"] if best else None,
        "capacity_conversations": best["mean_concurrent_conversations"] if best else 0,
        "criterion": f"TTFA p95 <= {TTFA_P95_LIMIT_S * 1000:.0f} ms, zero underruns, no failed turn",
    }
