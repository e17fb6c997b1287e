"""The engine replicas' backend in the Ray Serve tests (``--engine-factory tests.serve.held_engine:build``):
the real engine of ``model_server.py``, except for requests seeded with :data:`HOLD_SEED` or
:data:`KILL_ENGINE_SEED`.

Such a request is a turn that stays in flight until its client goes: the engine generates its first
token (so the stream has really started on that replica) and is then stopped, and the stream waits
without a token until it is cancelled. A test can keep every replica full that way without the
engines burning the machine's two cores (a greedy answer would generate thousands of tokens meanwhile,
starving Ray's own health checks on a loaded machine). After the first token of a request seeded with
:data:`KILL_ENGINE_SEED` the engine's worker "dies" as in tests/server/fault_server.py: the engine stops under its streams
and the failure is reported the way ``Engine.add_failure_callback`` reports it. Every other request is
the engine's, unchanged.
"""

from __future__ import annotations

import asyncio
import os

from glm4voice.server.engine_backend import as_backend, build_engine

HOLD_SEED = 4242424242
KILL_ENGINE_SEED = 4444444444
KILL_MARKER_ENV = "GLM4VOICE_TEST_KILL_MARKER"
"""A file path (set by the test for the whole cluster): created by the one replica that kills its engine."""


class HeldStream:
    def __init__(self, inner):
        self.inner = inner
        self.started = False

    def __aiter__(self) -> HeldStream:
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


class InjectedWorkerDeath(RuntimeError):
    pass


class HeldBackend:
    is_token_backend = True

    def __init__(self, inner):
        self.inner = inner
        self.failure_callbacks = []
        self.killer = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add_failure_callback(self, callback) -> None:
        self.failure_callbacks.append(callback)
        self.inner.add_failure_callback(callback)

    async def kill_engine(self) -> None:
        await self.inner.engine.stop()  # every open stream ends with an error, as when a worker dies
        for callback in self.failure_callbacks:
            callback(InjectedWorkerDeath("injected engine worker death (test)"))

    def submit(self, prompt_ids, request):
        stream = self.inner.submit(prompt_ids, request)
        if request.seed == KILL_ENGINE_SEED:
            return KillingStream(stream, self)
        return HeldStream(stream) if request.seed == HOLD_SEED else stream


class KillingStream:
    """The engine's stream; after its first token the engine's worker "dies" under it."""

    def __init__(self, inner, backend: HeldBackend):
        self.inner = inner
        self.backend = backend

    def __aiter__(self) -> KillingStream:
        return self

    async def __anext__(self) -> int:
        token = await anext(self.inner)
        if self.backend.killer is None and _first_kill():
            self.backend.killer = asyncio.get_running_loop().create_task(self.backend.kill_engine())
        return token

    def cancel(self) -> None:
        self.inner.cancel()


def _first_kill() -> bool:
    """Whether no replica of this cluster has killed its engine yet (a file named by the test, created by
    the first): a request whose replica died before it saw a token is sent to another replica, and must
    not take that one down too."""
    try:
        open(os.environ[KILL_MARKER_ENV], "x").close()
    except FileExistsError:
        return False
    return True


def build(settings):
    return HeldBackend(as_backend(build_engine(settings), settings))
