"""Load generator for a running token server (model_server.py): time to first token and
per-stream tokens/s at rising concurrency.

    python model_server.py --port 10000 --model-path THUDM/glm-4-voice-9b --device cuda:0 &
    python -m bench.server --url http://127.0.0.1:10000 --concurrency 1,4,16,32 --max-new-tokens 256

Loopback only (the URL's host must resolve to 127.0.0.0/8 or ::1) and bounded: at most
``MAX_CONCURRENCY`` clients, ``MAX_REQUESTS_PER_LEVEL`` requests and ``MAX_LEVEL_SECONDS`` per level.
At each level, ``c`` clients send requests back to back until the level has ``--requests`` (at
least ``c``) answers. Prints the machine, the command, the server's /health, and per level:
answers (ok / 503 / failed), time to first token (p50, p90, p99: request sent -> first line),
per-stream decode rate (tokens after the first / time after the first; p50 and p10, the slow
streams), and the aggregate token rate (all tokens / wall time of the level).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from bench.common import machine_info, machine_line
from glm4voice.client import AsyncTokenClient, ServerBusyError, TokenServerError
from glm4voice.defaults import LOOPBACK_HOST, TOKEN_SERVER_PORT
from glm4voice.protocol import TextInput, render_prompt_text

MAX_CONCURRENCY = 256
MAX_REQUESTS_PER_LEVEL = 4096
MAX_LEVEL_SECONDS = 600.0
DEFAULT_PROMPT = render_prompt_text("", TextInput("Tell me a long story about a curious little cat who loved music."))


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    decode_s: float
    """From the first token to the last."""

    @property
    def stream_rate(self) -> float | None:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else None


@dataclass
class Level:
    concurrency: int
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    busy: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ttft = [s.ttft_s for s in self.samples]
        rates = [r for r in (s.stream_rate for s in self.samples) if r is not None]
        tokens = sum(s.tokens for s in self.samples)
        return {
            "concurrency": self.concurrency,
            "ok": len(self.samples),
            "busy_503": self.busy,
            "failed": self.failed,
            "ttft_p50_ms": _ms(_pct(ttft, 50)),
            "ttft_p90_ms": _ms(_pct(ttft, 90)),
            "ttft_p99_ms": _ms(_pct(ttft, 99)),
            "stream_tok_s_p50": _round(_pct(rates, 50)),
            "stream_tok_s_p10": _round(_pct(rates, 10)),
            "aggregate_tok_s": _round(tokens / self.wall_s if self.wall_s else None),
            "mean_tokens": _round(tokens / len(self.samples) if self.samples else None),
            "wall_s": _round(self.wall_s),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def require_loopback(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SystemExit(f"--url must be http://HOST:PORT, got {url!r}")
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 80, proto=socket.IPPROTO_TCP)
    except OSError as error:
        raise SystemExit(f"cannot resolve {parsed.hostname!r}: {error}") from error
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(
            f"refusing to load {parsed.hostname} ({', '.join(sorted(addresses))}): loopback addresses only"
        )


async def run_level(
    client: AsyncTokenClient, concurrency: int, requests: int, body: dict, level_timeout_s: float
) -> Level:
    level = Level(concurrency)
    remaining = max(requests, concurrency)
    seed = iter(range(10**9))

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            first = last = None
            tokens = 0
            try:
                async for _ in client.stream(**body, seed=next(seed)):
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    tokens += 1
            except ServerBusyError:
                level.busy += 1
                await asyncio.sleep(0.05)
                continue
            except TokenServerError as error:
                level.failed += 1
                level.errors.append(str(error)[:200])
                continue
            if first is not None:
                level.samples.append(Sample(first - started, tokens, last - first))

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=level_timeout_s)
    except TimeoutError:
        level.errors.append(f"level stopped after {level_timeout_s:g} s")
    level.wall_s = time.perf_counter() - started
    return level


COLUMNS = (  # title, width, summary key
    ("conc", 5, "concurrency"),
    ("ok", 5, "ok"),
    ("503", 4, "busy_503"),
    ("fail", 4, "failed"),
    ("ttft p50 ms", 11, "ttft_p50_ms"),
    ("p90", 8, "ttft_p90_ms"),
    ("p99", 8, "ttft_p99_ms"),
    ("stream tok/s p50", 17, "stream_tok_s_p50"),
    ("p10", 7, "stream_tok_s_p10"),
    ("total tok/s", 12, "aggregate_tok_s"),
    ("tokens", 7, "mean_tokens"),
)


async def main_async(args: argparse.Namespace) -> list[dict]:
    body = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    if args.prompt_tokens:
        body["prompt_token_ids"] = [(7 * k) % 500 + 100 for k in range(args.prompt_tokens)]
    else:
        body["prompt"] = args.prompt
    async with AsyncTokenClient(args.url, max_connections=MAX_CONCURRENCY + 8) as client:
        health = await client.health()
        print(f"server: {json.dumps({k: v for k, v in health.items() if k != 'engine'})}", flush=True)
        if args.warmup:
            await client.generate(**body, seed=0)
        results = []
        print(" ".join(f"{title:>{width}}" for title, width, _ in COLUMNS), flush=True)
        for concurrency in args.concurrency:
            level = await run_level(client, concurrency, args.requests, body, args.level_timeout)
            row = level.summary()
            results.append(row)
            print(" ".join(f"{_fmt(row[key]):>{width}}" for _, width, key in COLUMNS), flush=True)
            for error in level.errors[:3]:
                print(f"      error: {error}", flush=True)
        return results


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url", default=f"http://{LOOPBACK_HOST}:{TOKEN_SERVER_PORT}", help="the token server (loopback only)"
    )
    parser.add_argument(
        "--concurrency", default="1,2,4,8,16", help="comma-separated client counts (default %(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=32, help="answers per level, at least the concurrency (default %(default)s)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a first-turn text prompt)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="send this many prompt ids instead of --prompt")
    parser.add_argument(
        "--level-timeout", type=float, default=300.0, help=f"seconds per level (at most {MAX_LEVEL_SECONDS:g})"
    )
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one warm-up request")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency must be integers separated by commas")
    if not args.concurrency or not all(1 <= c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"--concurrency values must be in [1, {MAX_CONCURRENCY}]")
    if not 1 <= args.requests <= MAX_REQUESTS_PER_LEVEL:
        parser.error(f"--requests must be in [1, {MAX_REQUESTS_PER_LEVEL}]")
    if not 0 < args.level_timeout <= MAX_LEVEL_SECONDS:
        parser.error(f"--level-timeout must be in (0, {MAX_LEVEL_SECONDS:g}]")
    if not 0 <= args.prompt_tokens <= 100_000:
        parser.error("--prompt-tokens must be in [0, 100000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_loopback(args.url)
    print(f"machine: {machine_line(machine_info())}")
    print(f"command: python -m bench.server {' '.join(sys.argv[1:])}", flush=True)
    results = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine_info(), "command": sys.argv, "levels": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
