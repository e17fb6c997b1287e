"""The adapter from the LLM engine to the token server: how a dead engine is reported."""

from __future__ import annotations

import logging

from glm4voice.server.engine_backend import EngineBackend


class EngineThatReportsDeath:
    """Has ``add_failure_callback``, as ``glm4voice.llm.engine.Engine`` does once its worker can die visibly."""

    def __init__(self):
        self.callbacks = []

    def add_failure_callback(self, callback) -> None:
        self.callbacks.append(callback)


def test_failure_callbacks_reach_an_engine_that_reports_its_death():
    engine = EngineThatReportsDeath()
    seen = []
    EngineBackend(engine, "model").add_failure_callback(seen.append)
    error = RuntimeError("device lost")
    for callback in engine.callbacks:
        callback(error)
    assert seen == [error]


def test_an_engine_that_cannot_report_its_death_is_named_in_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="glm4voice.server"):
        EngineBackend(object(), "model").add_failure_callback(lambda error: None)
    assert "cannot report a dead worker" in caplog.text
