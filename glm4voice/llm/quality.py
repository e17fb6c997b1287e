"""Does a quantized LLM answer like bfloat16? One command, with the real weights::

    python -m glm4voice.llm.quality --model-path THUDM/glm-4-voice-9b --dtype int4

On a fixed set of prompts, each a new conversation in the original's prompt format: text questions
(English, Mandarin, Cantonese) and spoken ones (espeak-ng speech tokenized by the speech tokenizer,
``--tokenizer-path``, as the demo tokenizes a microphone):

1. the reference (``--reference-dtype``: bfloat16 on a GPU, float32 on a CPU) answers every prompt
   greedily through the engine, up to ``--steps`` tokens (256), and one forward pass over prompt +
   answer gives its next-token distribution at every answer position;
2. the reference is freed, then the tested dtype is loaded (the two never need memory at once, so a
   card that holds only the int4 model can run the check with ``--reference-device cpu``): it answers
   every prompt greedily too, and scores the reference's answer in one forward pass.

Per prompt: how many greedy tokens the two answers share before they part; top-1 agreement (the share
of the reference answer's positions where the tested model's most likely token is the reference's);
mean KL(reference || tested) of the next-token distributions over those positions (nats); and whether
each answer keeps the 13 text / 26 audio interleave. The verdict (:data:`VERDICT_RULES`): PASS,
MARGINAL or FAIL (also FAIL: the tested model breaks the interleave where the reference keeps it).
Exit status 0 for PASS and MARGINAL, 1 for FAIL, 2 for a usage error (e.g. a dtype the device cannot run).

The metric functions (:func:`compare_next_token`, :func:`identical_prefix`, :func:`interleave_kept`)
are shared with ``bench/llm.py``, which reports the same figures on random full-size weights.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, TEXT_TOKENS_PER_SEGMENT

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 256
TEXT_PROMPTS = (
    "Tell me a short story about a cat.",
    "你好，请介绍一下你自己。",
    "What is the capital of France, and what is it famous for?",
    "请用粤语说一句早上好，再解释它的意思。",
    "Please speak faster and tell me how to boil an egg.",
    "Give me three tips for sleeping better, in a sad voice.",
)
"""Text questions (a new conversation each)."""
SPOKEN_PROMPTS = (
    ("Hello! Can you tell me a short story about a cat, please?", "en-us", 150),
    ("What is the weather usually like in spring?", "en-us", 150),
    ("你好，请给我讲一个关于小猫的简短故事。", "cmn", 150),
    ("请慢慢地介绍一下北京。", "cmn", 150),
)
"""Spoken questions: (text, espeak-ng voice, words per minute), as resources/make_samples.sh makes the
demo's sample prompts."""


@dataclass(frozen=True)
class VerdictRule:
    verdict: str
    min_top1: float
    max_kl: float


VERDICT_RULES = (VerdictRule("PASS", 0.95, 0.02), VerdictRule("MARGINAL", 0.85, 0.10))
"""The first rule whose top-1 agreement and mean KL both hold names the verdict; none: FAIL."""
FAIL = "FAIL"


# --- metrics ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextTokenComparison:
    positions: int
    top1_agreement: float
    """Share of positions where the two argmaxes agree."""
    mean_kl: float
    """Mean KL(reference || tested) of the next-token distributions, nats."""


def compare_next_token(reference: torch.Tensor, tested: torch.Tensor) -> NextTokenComparison:
    """``reference`` and ``tested``: logits (or log-probabilities) [positions, vocab] of the same positions."""
    if reference.shape != tested.shape or reference.dim() != 2:
        raise ValueError(f"need two [positions, vocab] tensors of one shape, got {reference.shape} and {tested.shape}")
    ref = torch.log_softmax(reference.float(), dim=-1)
    test = torch.log_softmax(tested.float().to(ref.device), dim=-1)
    kl = (ref.exp() * (ref - test)).sum(-1).clamp_min(0)  # [positions]
    agree = int((ref.argmax(-1) == test.argmax(-1)).sum())
    return NextTokenComparison(reference.shape[0], agree / reference.shape[0], kl.mean().item())


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens two sequences share before they part."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def interleave_kept(tokens: Sequence[int], audio_offset: int, stop_ids: frozenset[int] = frozenset()) -> bool:
    """The answer (up to its first stop id) follows the protocol's pattern: it starts with text; text
    comes in runs of 13 tokens, each followed by 26 audio tokens; a shorter text run ends the text (only
    audio follows); the last run may be cut short (the answer or the step budget ended)."""
    body = list(itertools.takewhile(lambda t: t not in stop_ids, tokens))
    runs = [(audio, len(list(group))) for audio, group in itertools.groupby(body, lambda t: t >= audio_offset)]
    if not runs or runs[0][0]:
        return False
    text_ended = False
    for i, (audio, n) in enumerate(runs):
        last = i == len(runs) - 1
        if audio:
            if not last and n != AUDIO_TOKENS_PER_SEGMENT:
                return False
        else:
            if text_ended or n > TEXT_TOKENS_PER_SEGMENT:
                return False
            text_ended = n < TEXT_TOKENS_PER_SEGMENT
    return True


def verdict(top1: float, kl: float, interleave_broken: bool = False) -> str:
    if interleave_broken:
        return FAIL
    return next((rule.verdict for rule in VERDICT_RULES if top1 >= rule.min_top1 and kl <= rule.max_kl), FAIL)


# --- prompts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    name: str
    kind: str
    """"text" or "speech"."""
    ids: tuple[int, ...]


def build_prompts(text_tokenizer, speech_tokenizer=None, max_name: int = 28) -> list[Prompt]:
    """The fixed prompt set as token ids; the spoken ones only with a ``speech_tokenizer``."""
    from glm4voice.protocol import AudioInput, Conversation, SpecialTokens, TextInput

    codes = speech_tokenizer.num_codes if speech_tokenizer is not None else None
    special = SpecialTokens.from_tokenizer(text_tokenizer, **({"num_audio_codes": codes} if codes else {}))
    prompts = []
    for text in TEXT_PROMPTS:
        ids = Conversation(text_tokenizer, special).prompt_for(TextInput(text))
        prompts.append(Prompt(_short(text, max_name), "text", tuple(ids)))
    if speech_tokenizer is not None:
        from glm4voice.espeak import speak

        audios = [speak(text, voice, words_per_minute=wpm) for text, voice, wpm in SPOKEN_PROMPTS]
        for (text, _, _), speech in zip(SPOKEN_PROMPTS, speech_tokenizer.tokenize_batch(audios)):
            ids = Conversation(text_tokenizer, special).prompt_for(AudioInput(tuple(speech)))
            prompts.append(Prompt(_short(text, max_name), "speech", tuple(ids)))
    return prompts


def _short(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns (CJK characters take two)."""
    if _columns(text) <= width:
        return text
    while _columns(text) > width - 1:
        text = text[:-1]
    return text + "…"


def _columns(text: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _columns(text))


# --- running a model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answers:
    """One model's greedy answers and its next-token logits along the reference answers."""

    tokens: list[list[int]]
    scored: list[torch.Tensor]
    """Per prompt: float32 logits [len(reference answer), vocab] on the CPU."""


def answer_and_score(loaded, config, prompts: Sequence[Prompt], steps: int,
                     reference: Sequence[Sequence[int]] | None = None) -> Answers:  # fmt: skip
    """Greedy answers of every prompt through the engine (one at a time: the same kernels as a single
    user gets), then one forward pass over each prompt + answer (``reference``'s answers if given, else
    its own) giving the logits that predicted each answer token."""
    from glm4voice.llm.engine import Engine, SamplingParams

    greedy = SamplingParams(temperature=0, max_new_tokens=steps)

    async def generate() -> list[list[int]]:
        async with Engine(loaded, config) as engine:
            return [[t async for t in engine.submit(p.ids, greedy)] for p in prompts]

    tokens = asyncio.run(generate())
    targets = reference if reference is not None else tokens
    model = loaded.model
    scored = []
    with torch.inference_mode():
        for prompt, answer in zip(prompts, targets):
            ids = torch.tensor(list(prompt.ids) + list(answer), device=model.device)
            logits = model(ids)  # [n, vocab] float32
            scored.append(logits[len(prompt.ids) - 1 : len(prompt.ids) - 1 + len(answer)].cpu())
    return Answers(tokens, scored)


def engine_config(device: torch.device, dtype: str, method: str | None, max_seq_len: int, eager: bool):
    from glm4voice.llm.engine import EngineConfig

    return EngineConfig(
        device=str(device), dtype=dtype, quant_method=method, max_batch_size=1, max_seq_len=max_seq_len,
        cuda_graph_batch_sizes=(1,), prefill_graph_lengths=(), prefix_cache=False, eager=eager,
    )  # fmt: skip


def free_memory() -> None:
    """After the caller dropped a model: free it before the next one loads (compiled graphs hold
    references too)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the report -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptResult:
    name: str
    kind: str
    prompt_tokens: int
    steps: int
    """Tokens of the reference answer (the positions scored)."""
    identical_prefix: int
    top1_agreement: float
    mean_kl: float
    interleave_reference: bool
    interleave_tested: bool

    @property
    def interleave_broken(self) -> bool:
        return self.interleave_reference and not self.interleave_tested

    @property
    def verdict(self) -> str:
        return verdict(self.top1_agreement, self.mean_kl, self.interleave_broken)


@dataclass(frozen=True)
class QualityReport:
    tested: str
    reference: str
    results: tuple[PromptResult, ...]

    @property
    def positions(self) -> int:
        return sum(r.steps for r in self.results)

    @property
    def top1_agreement(self) -> float:
        """Over all scored positions (prompts weighted by their answer length)."""
        return sum(r.top1_agreement * r.steps for r in self.results) / max(1, self.positions)

    @property
    def mean_kl(self) -> float:
        return sum(r.mean_kl * r.steps for r in self.results) / max(1, self.positions)

    @property
    def verdict(self) -> str:
        broken = any(r.interleave_broken for r in self.results)
        return verdict(self.top1_agreement, self.mean_kl, broken)

    def to_dict(self) -> dict:
        return {"tested": self.tested, "reference": self.reference, "positions": self.positions,
                "top1_agreement": round(self.top1_agreement, 4), "mean_kl": round(self.mean_kl, 5),
                "verdict": self.verdict, "prompts": [dataclasses.asdict(r) | {"verdict": r.verdict} for r in self.results],
                "rules": [dataclasses.asdict(rule) for rule in VERDICT_RULES]}  # fmt: skip

    def table(self) -> str:
        header = (f"{'prompt':<28}  {'kind':<6}  {'prompt':>6}  {'steps':>5}  {'same':>5}  {'top-1':>6}  "
                  f"{'mean KL':>8}  {'13/26 ref':>9}  {'13/26 test':>10}  verdict")  # fmt: skip
        lines = [f"{self.tested} against {self.reference}: greedy answers and next-token distributions", header,
                 "-" * len(header)]  # fmt: skip
        for r in self.results:
            lines.append(
                f"{_pad(r.name, 28)}  {r.kind:<6}  {r.prompt_tokens:>6}  {r.steps:>5}  {r.identical_prefix:>5}  "
                f"{r.top1_agreement:>6.3f}  {r.mean_kl:>8.4f}  {_yes(r.interleave_reference):>9}  "
                f"{_yes(r.interleave_tested):>10}  {r.verdict}"
            )
        lines.append("-" * len(header))
        kept = sum(r.interleave_tested for r in self.results if r.interleave_reference)
        wanted = sum(r.interleave_reference for r in self.results)
        lines.append(
            f"{'all prompts':<28}  {'':<6}  {'':>6}  {self.positions:>5}  {'':>5}  {self.top1_agreement:>6.3f}  "
            f"{self.mean_kl:>8.4f}  interleave kept {kept}/{wanted} where the reference keeps it  {self.verdict}"
        )
        rules = "; ".join(f"{r.verdict}: top-1 >= {r.min_top1}, mean KL <= {r.max_kl}" for r in VERDICT_RULES)
        lines.append(f"verdict rules: {rules}; otherwise, or an interleave broken where the reference keeps it, FAIL")
        lines.append("same: greedy tokens shared before the answers part; top-1 and KL: over the reference "
                     "answer's positions (teacher forcing)")  # fmt: skip
        return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def compare(tested_name: str, reference_name: str, prompts: Sequence[Prompt], reference: Answers, tested: Answers,
            audio_offset: int, stop_ids: frozenset[int]) -> QualityReport:  # fmt: skip
    results = []
    for i, prompt in enumerate(prompts):
        ref_answer, test_answer = reference.tokens[i], tested.tokens[i]
        scores = compare_next_token(reference.scored[i], tested.scored[i])
        results.append(PromptResult(
            name=prompt.name, kind=prompt.kind, prompt_tokens=len(prompt.ids), steps=len(ref_answer),
            identical_prefix=identical_prefix(ref_answer, test_answer), top1_agreement=scores.top1_agreement,
            mean_kl=scores.mean_kl, interleave_reference=interleave_kept(ref_answer, audio_offset, stop_ids),
            interleave_tested=interleave_kept(test_answer, audio_offset, stop_ids),
        ))  # fmt: skip
    return QualityReport(tested_name, reference_name, tuple(results))


# --- the command ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from glm4voice.devices import AUTO, FLOAT_DTYPES, llm_dtypes
    from glm4voice.hub import PUBLISHED_LLM, PUBLISHED_SPEECH_TOKENIZER
    from glm4voice.llm.quant import METHODS

    parser = argparse.ArgumentParser(prog="python -m glm4voice.llm.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--model-path", default=PUBLISHED_LLM, help="glm-4-voice-9b folder or hub id (default %(default)s)"
    )
    parser.add_argument("--tokenizer-path", default=PUBLISHED_SPEECH_TOKENIZER,
                        help="speech tokenizer folder or hub id, for the spoken prompts (default %(default)s)")  # fmt: skip
    parser.add_argument("--dtype", required=True, choices=llm_dtypes(), help="the dtype to check")
    parser.add_argument("--method", choices=sorted({m.name for m in METHODS}),
                        help="how the quantized dtype is implemented (default: the engine's)")  # fmt: skip
    parser.add_argument("--device", default=AUTO, help="cuda:N or cpu (default: cuda:0 if present)")
    parser.add_argument("--reference-dtype", default=AUTO, choices=(AUTO, *FLOAT_DTYPES),
                        help="default: bfloat16 on CUDA, float32 on a CPU")  # fmt: skip
    parser.add_argument("--reference-device", help="default: --device (cpu: for a GPU too small for bf16)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="greedy tokens per answer (%(default)s)")
    parser.add_argument("--no-spoken", dest="spoken", action="store_false", help="text prompts only")
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs (debugging)")
    parser.add_argument("--json", help="also write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from glm4voice.devices import AUTO, DeviceError, resolve_device
    from glm4voice.llm.quant import check_supported

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        device = resolve_device(args.device)
        reference_device = resolve_device(args.reference_device) if args.reference_device else device
        check_supported(args.dtype, device, args.method)  # before minutes of loading
    except (DeviceError, ValueError) as error:
        parser.error(str(error))
    if args.reference_dtype == AUTO:
        args.reference_dtype = "bfloat16" if reference_device.type == "cuda" else "float32"
    report = run(args, device, reference_device)
    sys.stdout.write(report.table() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if report.verdict == FAIL else 0


def run(args, device: torch.device, reference_device: torch.device) -> QualityReport:
    from glm4voice.hub import resolve_checkpoint
    from glm4voice.llm.checkpoint import ALLOW_PATTERNS, load_model
    from glm4voice.llm.quant import QUANTIZED_DTYPES, resolve_method
    from glm4voice.protocol import SpecialTokens
    from glm4voice.text_tokenizer import GLMTokenizer

    folder = resolve_checkpoint(args.model_path, allow_patterns=ALLOW_PATTERNS)
    text_tokenizer = GLMTokenizer.from_pretrained(folder)
    speech_tokenizer = None
    if args.spoken:
        from speech_tokenizer import SpeechTokenizer

        speech_tokenizer = SpeechTokenizer.from_pretrained(args.tokenizer_path, device=device)
    prompts = build_prompts(text_tokenizer, speech_tokenizer)
    special = SpecialTokens.from_tokenizer(text_tokenizer)
    speech_tokenizer = None
    free_memory()
    longest = max(len(p.ids) for p in prompts) + args.steps + 1
    logger.info("%d prompts (longest %d tokens), %d greedy steps each", len(prompts), longest - args.steps - 1,
                args.steps)  # fmt: skip

    logger.info("reference: %s on %s", args.reference_dtype, reference_device)
    loaded = load_model(folder, device=reference_device, dtype=args.reference_dtype)
    config = engine_config(reference_device, args.reference_dtype, None, longest, args.eager)
    reference = answer_and_score(loaded, config, prompts, args.steps)
    stop_ids = loaded.stop_ids
    del loaded
    free_memory()

    quantized = args.dtype in QUANTIZED_DTYPES
    tested_name = resolve_method(args.dtype, args.method).spec if quantized else args.dtype
    logger.info("tested: %s on %s", tested_name, device)
    config = engine_config(device, args.dtype, args.method, longest, args.eager)
    loaded = load_model(folder, device=device, dtype=config.activation_dtype(),
                        quantize=args.dtype if quantized else None, method=args.method)  # fmt: skip
    tested = answer_and_score(loaded, config, prompts, args.steps, reference=reference.tokens)
    del loaded
    free_memory()
    return compare(tested_name, args.reference_dtype, prompts, reference, tested, special.audio_offset, stop_ids)


if __name__ == "__main__":
    sys.exit(main())
