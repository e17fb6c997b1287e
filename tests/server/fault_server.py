"""The real token server with fault injection, for tests: ``python tests/server/fault_server.py
[model_server.py flags]``.

Built like ``model_server.main`` (same settings, real engine, same uvicorn server), but the backend makes
chosen requests fail, selected by their seed: ``FAIL_AT_START_SEED`` fails before the first token,
``FAIL_AFTER_SEED`` after ``FAIL_AFTER_TOKENS`` tokens (the engine's stream is cancelled, as a real
failure would end it). ``KILL_ENGINE_SEED`` makes the engine's worker "die": every stream ends with an
error (the real engine is stopped under them), then the backend reports the failure to the server the
way ``glm4voice.llm.engine.Engine.add_failure_callback`` does.
"""

from __future__ import annotations

import asyncio
import logging

from glm4voice.server.app import create_app, serve
from glm4voice.server.engine_backend import EngineBackend, build_engine
from model_server import build_parser, settings_from_args

FAIL_AT_START_SEED = 4242
FAIL_AFTER_SEED = 4343
FAIL_AFTER_TOKENS = 3
KILL_ENGINE_SEED = 4444


class InjectedFault(RuntimeError):
    pass


class FailingStream:
    def __init__(self, stream, fail_after: int):
        self._stream = stream
        self._left = fail_after

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        if self._left == 0:
            self._stream.cancel()
            raise InjectedFault("injected engine fault (test)")
        self._left -= 1
        return await anext(self._stream)

    def cancel(self) -> None:
        self._stream.cancel()


class InjectedWorkerDeath(RuntimeError):
    pass


class FaultyBackend(EngineBackend):
    def __init__(self, engine, model_path):
        super().__init__(engine, model_path)
        self._failure_callbacks = []
        self._killer = None

    def add_failure_callback(self, callback) -> None:
        self._failure_callbacks.append(callback)

    async def _kill_engine(self) -> None:
        logging.getLogger("fault_server").critical("injecting an engine worker death (test)")
        await self.engine.stop()  # every open stream ends with an error, as when a worker dies
        error = InjectedWorkerDeath("injected engine worker death (test)")
        for callback in self._failure_callbacks:
            callback(error)

    def submit(self, prompt_ids, request):
        stream = super().submit(prompt_ids, request)
        if request.seed == KILL_ENGINE_SEED and self._killer is None:
            self._killer = asyncio.get_running_loop().create_task(self._kill_engine())
        if request.seed == FAIL_AT_START_SEED:
            return FailingStream(stream, 0)
        if request.seed == FAIL_AFTER_SEED:
            return FailingStream(stream, FAIL_AFTER_TOKENS)
        return stream


def main() -> None:
    settings = settings_from_args(build_parser().parse_args())
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(FaultyBackend(build_engine(settings), settings.model_path), settings)
    raise SystemExit(serve(app, settings))


if __name__ == "__main__":
    main()
