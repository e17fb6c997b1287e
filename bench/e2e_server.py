"""Bench-only token server for bench/e2e.py: the token server's app (``glm4voice.server.app.create_app``)
around an engine built from full-size random weights made directly on the GPU, with the answers
forced into the 13 text / 26 audio interleave of a real conversation.

    python bench/e2e_server.py --port 18123 --tokenizer-dir DIR [--config small --device cpu] [--dtype fp8]

``--dtype``: any of the engine's (model_server.py's) dtypes; a quantized one (int8, fp8, int4) is applied
to the random weights as the engine's loader applies it to a checkpoint (glm4voice.llm.quant), and then
the reference-style server (which needs float weights) is off: pass ``--no-reference``.

Why forced: random weights never emit the 13/26 pattern (nor <|user|>), so neither the decoder
nor the demultiplexer would see a real conversation's work. ``PatternBackend`` wraps the engine and
replaces every sampled id by the id the pattern puts at that position; the engine still computes
and samples every token exactly as in production (same prompt, same sampling, same steps), only
the id that goes on the wire changes. A request's ``max_new_tokens`` sets the answer length: the
last of those tokens is replaced by ``<|user|>`` (end of turn). The forcing lives only here.

Forced ids and the engine's prefix cache: the engine caches what it computed (the prompt and its
own sampled ids), the client's history holds the forced ids. So that a conversation's next turn
reuses the cache as in production, :class:`ForcedHistory` maps a prompt's forced history back to the
engine's ids before submitting (same length; only the ids the forcing replaced differ).

The same backend runs in the benchmark's own process for the one-process layout
(:func:`build_backend`, served by ``glm4voice.server.inprocess``).

``/reference/generate_stream`` (same wire format) is the reference-style baseline the original
server runs: transformers' ``GlmForCausalLM`` over the same weights (``glm4voice.llm.hf_glm``),
``generate()`` in a thread feeding a token streamer, batch 1, with a LogitsProcessor that forces
the same pattern. ``/bench/prefill_graphs`` switches the engine's prefill graphs on or off (to
measure both in one run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # at module level: the endpoints' annotations are resolved here

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from glm4voice.devices import llm_dtypes, prefer_expandable_segments
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT, TEXT_TOKENS_PER_SEGMENT

logger = logging.getLogger("bench.e2e_server")

PATTERN_TEXT = "Sure! Here is a short story about a curious little cat who loved music, and the weather was nice."
FORCED_HISTORY_ENTRIES = 1024
"""Finished answers whose engine ids are remembered (least recently used dropped first)."""


def answer_length(audio_tokens: int) -> int:
    """max_new_tokens of a forced answer with ``audio_tokens`` audio tokens (13/26 interleave, then the
    end-of-turn id)."""
    k = audio = 0
    while audio < audio_tokens:
        audio += (k % (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT)) >= TEXT_TOKENS_PER_SEGMENT
        k += 1
    return k + 1


@dataclass(frozen=True)
class AnswerPattern:
    """The id at position ``k`` of an answer of ``length`` tokens (the last one is ``end_id``)."""

    text_ids: tuple[int, ...]
    audio_offset: int
    num_audio_codes: int
    end_id: int

    def token(self, k: int, length: int, seed: int = 0) -> int:
        if k >= length - 1:
            return self.end_id
        cycle = k % (TEXT_TOKENS_PER_SEGMENT + AUDIO_TOKENS_PER_SEGMENT)
        if cycle < TEXT_TOKENS_PER_SEGMENT:
            return self.text_ids[k % len(self.text_ids)]
        code = (k * 7919 + seed * 104729) % (self.num_audio_codes - 1)  # codes vary like real speech
        return self.audio_offset + code

    @classmethod
    def from_tokenizer(cls, tokenizer) -> AnswerPattern:
        from glm4voice.protocol import SpecialTokens

        special = SpecialTokens.from_tokenizer(tokenizer)
        return cls(
            text_ids=tuple(tokenizer.encode(PATTERN_TEXT)),
            audio_offset=special.audio_offset,
            num_audio_codes=special.num_audio_codes,
            end_id=special.user,
        )


class ForcedHistory:
    """The engine's own ids for histories the client holds in forced ids (see the module doc).

    A conversation's history is its last prompt plus the answer without its end-of-turn id, and its
    next prompt goes on with ``<|user|>``: so the histories worth looking up end right before a
    ``<|user|>`` of the prompt (one candidate per earlier turn)."""

    def __init__(self, user_id: int, entries: int = FORCED_HISTORY_ENTRIES):
        self.user_id = user_id
        self.entries = entries
        self._engine_ids: collections.OrderedDict[tuple[int, ...], tuple[int, ...]] = collections.OrderedDict()

    def to_engine(self, prompt: list[int]) -> list[int]:
        """``prompt`` with its longest remembered history replaced by the engine's ids."""
        for end in reversed([i for i, token in enumerate(prompt) if token == self.user_id and i > 0]):
            found = self._engine_ids.get(tuple(prompt[:end]))
            if found is not None:
                self._engine_ids.move_to_end(tuple(prompt[:end]))
                return list(found) + prompt[end:]
        return prompt

    def remember(self, forced: list[int], engine: list[int]) -> None:
        """A finished answer: the history as the client will send it, and as the engine computed it."""
        assert len(forced) == len(engine)
        self._engine_ids[tuple(forced)] = tuple(engine)
        self._engine_ids.move_to_end(tuple(forced))
        while len(self._engine_ids) > self.entries:
            self._engine_ids.popitem(last=False)


class PatternStream:
    """An engine stream whose ids are replaced by the pattern's (same count, same timing); at the
    answer's end-of-turn id, its history is remembered (:class:`ForcedHistory`)."""

    def __init__(self, inner, pattern: AnswerPattern, length: int, seed: int, history: ForcedHistory | None = None,
                 client_prompt: list[int] = (), engine_prompt: list[int] = ()):  # fmt: skip
        self.inner, self.pattern, self.length, self.seed = inner, pattern, length, seed
        self.count = 0
        self.history = history
        self.forced = list(client_prompt)
        self.engine = list(engine_prompt)

    def __aiter__(self) -> PatternStream:
        return self

    async def __anext__(self) -> int:
        engine_id = await self.inner.__anext__()  # StopAsyncIteration / errors pass through
        k, self.count = self.count, self.count + 1
        token = self.pattern.token(k, self.length, self.seed)
        self.forced.append(token)
        self.engine.append(engine_id)
        if k == self.length - 1 and self.history is not None:
            # the end of the turn (the client stops reading here): the history is the answer but this id
            self.history.remember(self.forced[:-1], self.engine[:-1])
        return token

    def cancel(self) -> None:
        self.inner.cancel()


class PatternBackend:
    """``glm4voice.server.engine_backend.EngineBackend`` with forced answers (see the module doc)."""

    is_token_backend = True

    def __init__(self, engine, pattern: AnswerPattern, folder: Path):
        from glm4voice.server.engine_backend import EngineBackend

        self.inner = EngineBackend(engine, folder)
        self.engine = engine
        self.pattern = pattern
        self.checkpoint_folder = folder  # the tokenizer files (a local folder: no hub lookup)
        self.history = ForcedHistory(pattern.end_id)

    def __getattr__(self, name: str):
        """What this class does not define is the engine backend's own (start, stop, stats, make_way,
        ...): a method the server or the pipeline gains reaches the benchmark unchanged."""
        if name == "inner":  # not set yet: no endless lookup
            raise AttributeError(name)
        return getattr(self.inner, name)

    def submit(self, prompt_ids, request):
        engine_prompt = self.history.to_engine(list(prompt_ids))
        stream = self.inner.submit(engine_prompt, request)
        return PatternStream(stream, self.pattern, request.max_new_tokens, request.seed or 0, self.history,
                             list(prompt_ids), engine_prompt)  # fmt: skip

    def set_prefill_graphs(self, on: bool) -> list[int]:
        """Switch the engine's prefill CUDA graphs on or off (to measure both in one run): the lengths
        that have one (empty: none captured, nothing to switch)."""
        runner = self.engine.runner
        runner.prefill_graphs_enabled = bool(on) and bool(runner.prefill_graphs)
        return sorted(runner.prefill_graphs)


# --- the reference-style server: HF generate + a streamer thread --------------------------------------


def reference_app(model, pattern: AnswerPattern, max_new_tokens_cap: int):
    """FastAPI app with ``POST /generate_stream`` served as the original server does."""
    import torch
    from fastapi import FastAPI
    from starlette.responses import StreamingResponse
    from transformers import LogitsProcessor, LogitsProcessorList

    from glm4voice.llm.hf_glm import queue_streamer, to_transformers_glm
    from glm4voice.server import wire
    from glm4voice.server.schema import parse_generate_request

    hf = to_transformers_glm(model)
    hf.generation_config.eos_token_id = None  # the answer ends by the forced <|user|> and its length
    lock = threading.Lock()  # batch 1, one request at a time, as the original

    class ForcePattern(LogitsProcessor):
        def __init__(self, prompt_len: int, length: int, seed: int):
            self.prompt_len, self.length, self.seed = prompt_len, length, seed

        def __call__(self, input_ids, scores):
            k = input_ids.shape[1] - self.prompt_len
            forced = pattern.token(k, self.length, self.seed)
            scores = torch.full_like(scores, -float("inf"))
            scores[:, forced] = 0.0
            return scores

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        parsed = parse_generate_request(await request.body(), max_new_tokens_cap)
        ids = torch.tensor([parsed.prompt_token_ids], device=model.device)
        streamer = queue_streamer()
        kwargs = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=parsed.max_new_tokens,
            do_sample=True, temperature=parsed.temperature, top_p=parsed.top_p, streamer=streamer,
            logits_processor=LogitsProcessorList([ForcePattern(ids.shape[1], parsed.max_new_tokens, parsed.seed or 0)]),
        )  # fmt: skip

        def run():
            with lock:
                try:
                    hf.generate(**kwargs)
                except Exception:
                    logger.exception("reference generate failed")
                    streamer.queue.put(None)

        threading.Thread(target=run, daemon=True).start()

        def lines():
            while (token := streamer.queue.get()) is not None:
                yield wire.token_line(token)

        return StreamingResponse(lines(), media_type=wire.MEDIA_TYPE)

    return app


# --- main ---------------------------------------------------------------------------------------------


def build_backend(args):
    """The engine (random weights, built on ``args.device``; not started) inside a :class:`PatternBackend`,
    the server settings and the text tokenizer: what the bench server serves, and what the benchmark's
    one-process layout serves in its own process."""
    import torch

    from glm4voice.llm.checkpoint import random_model
    from glm4voice.llm.engine import Engine, EngineConfig
    from glm4voice.llm.quant import QUANTIZED_DTYPES
    from glm4voice.server.settings import ServerSettings
    from glm4voice.text_tokenizer import GLMTokenizer

    sys.path.insert(0, str(ROOT / "bench"))
    from llm import CONFIGS  # bench/llm.py: the published shape and a small CPU one

    started = time.perf_counter()
    config = EngineConfig(
        device=args.device, dtype=args.dtype, quant_method=args.quant_method, max_batch_size=args.max_streams,
        max_seq_len=args.max_seq_len, max_queue=2 * args.max_streams + 64, eager=args.eager,
    )  # fmt: skip
    config.check_supported()  # before minutes of building
    quantized = args.dtype in QUANTIZED_DTYPES
    model = random_model(CONFIGS[args.config], torch.device(args.device), config.activation_dtype(), seed=0,
                         quantize=args.dtype if quantized else None, method=args.quant_method)  # fmt: skip
    logger.info("random %s model (%s) on %s in %.1f s", args.config, args.dtype, args.device,
                time.perf_counter() - started)  # fmt: skip
    tokenizer = GLMTokenizer.from_pretrained(args.tokenizer_dir)
    pattern = AnswerPattern.from_tokenizer(tokenizer)
    engine = Engine.from_model(model, config, stop_ids=())  # the pattern's <|user|> ends answers
    settings = ServerSettings(
        host=args.host, port=args.port, model_path=str(args.tokenizer_dir), dtype=args.dtype,
        quant_method=args.quant_method, device=args.device,
        max_concurrent_streams=args.max_streams, max_queue=256, max_seq_len=args.max_seq_len, eager=args.eager,
        log_level="warning",
    )  # fmt: skip
    return PatternBackend(engine, pattern, Path(args.tokenizer_dir)), settings, tokenizer, model


def build(args):
    from glm4voice.server.app import create_app

    backend, settings, tokenizer, model = build_backend(args)
    app = create_app(backend, settings, tokenizer)
    if args.reference:
        app.mount("/reference", reference_app(model, backend.pattern, settings.max_new_tokens_cap))

    from starlette.responses import JSONResponse

    @app.post("/bench/prefill_graphs")
    async def prefill_graphs(request: Request):
        lengths = backend.set_prefill_graphs(json.loads(await request.body())["on"])
        return JSONResponse({"on": backend.engine.runner.prefill_graphs_enabled, "lengths": lengths})

    return app, settings


def main(argv=None) -> int:
    prefer_expandable_segments()  # as model_server.py does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer-dir", required=True, help="a text tokenizer folder (tokenizer.model + config)")
    parser.add_argument("--config", choices=("published", "small"), default="published")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=llm_dtypes())
    parser.add_argument("--quant-method", default=None, help="how a quantized --dtype is implemented")
    parser.add_argument("--max-streams", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this bench server only listens on loopback")
    from glm4voice.llm.quant import QUANTIZED_DTYPES

    if args.reference and args.dtype in QUANTIZED_DTYPES:
        parser.error(f"--dtype {args.dtype}: the reference-style server needs float weights; add --no-reference")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, settings = build(args)
    from glm4voice.server.app import serve

    return serve(app, settings)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
