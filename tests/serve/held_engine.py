"""The engine replicas' backend in the Ray Serve tests (``--engine-factory tests.serve.held_engine:build``):
the real engine of ``model_server.py``, except for requests seeded with :data:`HOLD_SEED`.

Such a request is a turn that stays in flight until its client goes: the engine generates its first
token (so the stream has really started on that replica) and is then stopped, and the stream waits
without a token until it is cancelled. A test can keep every replica full that way without the
engines burning the machine's two cores (a greedy answer would generate thousands of tokens meanwhile,
starving Ray's own health checks on a loaded machine). Every other request is the engine's, unchanged.
"""

from __future__ import annotations

import asyncio

from glm4voice.server.engine_backend import as_backend, build_engine

HOLD_SEED = 4242424242


class HeldStream:
    def __init__(self, inner):
        self.inner = inner
        self.started = False

    def __aiter__(self) -> "HeldStream":
        return self

    async def __anext__(self) -> int:
        if not self.started:
            self.started = True
            token = await anext(self.inner)
            self.inner.cancel()  # the engine's slot is free; the request stays open
            return token
        await asyncio.Event().wait()  # until the request is cancelled
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.inner.cancel()


class HeldBackend:
    is_token_backend = True

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, prompt_ids, request):
        stream = self.inner.submit(prompt_ids, request)
        return HeldStream(stream) if request.seed == HOLD_SEED else stream


def build(settings):
    return HeldBackend(as_backend(build_engine(settings), settings))
