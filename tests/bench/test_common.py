"""The benchmarks' shared harness: sections under a budget, results saved after each, machine info."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.common import BenchRun, machine_info, machine_line, median, time_call, timed


def test_sections_are_saved_as_they_finish_and_a_failure_does_not_stop_the_run(tmp_path):
    out = tmp_path / "result.json"
    run = BenchRun(out, budget_s=3600)
    run.record("machine", {"cpu": "test"})
    assert json.loads(out.read_text()) == {"machine": {"cpu": "test"}}
    assert run.section("ok", lambda: {"figure": 1.5})["figure"] == 1.5

    def broken() -> dict:
        raise RuntimeError("boom")

    failed = run.section("broken", broken)
    assert failed["error"] == "RuntimeError: boom" and "section_s" in failed
    saved = json.loads(out.read_text())
    assert list(saved) == ["machine", "ok", "broken"] and saved["ok"]["figure"] == 1.5


def test_a_section_that_does_not_fit_the_budget_is_skipped(tmp_path):
    run = BenchRun(None, budget_s=10)
    ran = []
    skipped = run.section("long", lambda: ran.append(1) or {}, need_s=60)
    assert ran == [] and skipped["skipped"].endswith("needs ~60 s")
    assert BenchRun().left_s() == float("inf")


def test_coroutine_sections_are_timed_recorded_and_skipped_alike(tmp_path):
    run = BenchRun(tmp_path / "result.json", budget_s=30)

    async def figures() -> dict:
        await asyncio.sleep(0)
        return {"figure": 2}

    async def broken() -> dict:
        raise ValueError("bad level")

    async def sections() -> list[dict]:
        return [await run.section_async("ok", figures), await run.section_async("broken", broken),
                await run.section_async("long", figures, need_s=60)]  # fmt: skip

    ok, failed, skipped = asyncio.run(sections())
    assert ok["figure"] == 2 and "section_s" in ok
    assert failed["error"] == "ValueError: bad level"
    assert "figure" not in skipped and skipped["skipped"].endswith("needs ~60 s")
    assert list(json.loads((tmp_path / "result.json").read_text())) == ["ok", "broken", "long"]


def test_machine_info_and_timing_helpers():
    info = machine_info("cpu", config="tiny")
    assert {"date", "command", "python", "cpu", "cpu_count", "torch"} <= set(info) and info["config"] == "tiny"
    assert "gpu" not in info and info["cpu"] in machine_line(info)
    assert "torch" not in machine_info()  # no device: no torch needed (bench/server.py)
    calls = []
    assert len(timed(lambda: calls.append(1), "cpu", iters=3, warmup=2)) == 3 and len(calls) == 5
    result, seconds = time_call(lambda: 42, "cpu")
    assert result == 42 and seconds >= 0
    assert median([3.0, None, 1.0, 2.0]) == 2.0 and median([None]) is None
    assert median([1 / 3], digits=2) == pytest.approx(0.33)
