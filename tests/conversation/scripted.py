"""A token client without a server: answers every request with scripted ids and records the prompts."""

from __future__ import annotations

import asyncio


class ScriptedClient:
    """Answers with ``ids``; with ``hold_after`` the stream stops after that many ids and stays open
    until the consumer leaves (an answer still being generated)."""

    base_url = "scripted"

    def __init__(self, ids: list[int], hold_after: int | None = None):
        self.ids = ids
        self.hold_after = hold_after
        self.prompts: list[list[int]] = []
        self.open_streams = 0
        self.closed_streams = 0
        self.held = asyncio.Event()

    async def stream(self, prompt=None, **params):
        self.prompts.append(list(params["prompt_token_ids"]))
        self.open_streams += 1
        try:
            for n, token_id in enumerate(self.ids):
                if n == self.hold_after:
                    self.held.set()
                    await asyncio.Event().wait()
                yield token_id
        finally:
            self.open_streams -= 1
            self.closed_streams += 1


def interleaved_answer(text_tokenizer, special, runs: int, *, end: bool = True) -> list[int]:
    """A GLM-4-Voice-shaped answer: runs of 13 text tokens and 26 audio tokens, then ``<|user|>``."""
    text = (text_tokenizer.encode("Sure, here is a short answer for you today my friend") * 2)[:13]
    ids: list[int] = []
    for run in range(runs):
        ids += text + [special.audio_offset + (run * 26 + k) * 5 % special.num_audio_codes for k in range(26)]
    return ids + ([special.user] if end else [])
