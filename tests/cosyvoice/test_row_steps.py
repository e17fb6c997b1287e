"""RowSteps: rows that join the Euler solve at different step boundaries end where a solve of each
alone ends."""

from __future__ import annotations

import pytest
import torch

from cosyvoice.flow.decoder import ConditionalDecoder
from cosyvoice.flow.flow_matching import ConditionalCFM
from cosyvoice.flow.row_steps import RowSteps

STEPS = 4


def _cfm() -> ConditionalCFM:
    torch.manual_seed(11)
    estimator = ConditionalDecoder(320, 80, channels=(16, 16), dropout=0, attention_head_dim=8, n_blocks=1,
                                   num_mid_blocks=2, num_heads=2, act_fn="gelu")  # fmt: skip
    with torch.no_grad():
        for p in estimator.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    params = {"solver": "euler", "t_scheduler": "cosine", "inference_cfg_rate": 0.7}
    return ConditionalCFM(240, params, 1, 80, estimator).eval()


def _row(frames: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, 80, frames, generator=g) for name in ("z", "mu", "cond")} | {
        "spks": torch.randn(1, 80, generator=g)
    }


def _alone(cfm: ConditionalCFM, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """The row solved by itself (every frame valid, no padding)."""
    return cfm.solve(row["z"], row["mu"], None, row["spks"], row["cond"], cfm.time_span(STEPS))


def _join(steps: RowSteps, tag: str, row: dict[str, torch.Tensor]) -> None:
    steps.join([tag], row["z"], row["mu"], row["cond"], row["spks"], [row["z"].shape[2]])


@torch.no_grad()
def test_rows_joining_at_different_steps_end_as_each_alone():
    cfm = _cfm()
    steps = RowSteps(cfm, STEPS, torch.device("cpu"), 80, bucket_frames=8, batch_sizes=(1, 2, 4))
    rows = {"a": _row(19, 1), "b": _row(33, 2), "c": _row(7, 3), "d": _row(12, 4)}
    joins = {0: ["a"], 1: ["b", "c"], 3: ["d"]}  # boundary -> rows that join there
    left: dict[str, torch.Tensor] = {}
    stepped = []
    boundary = 0
    while boundary < 20 and len(left) < len(rows):
        for tag in joins.get(boundary, []):
            _join(steps, tag, rows[tag])
        stepped.append(steps.step())
        for tag, mel in steps.leave():
            assert tag not in left
            left[tag] = mel
        boundary += 1
    assert stepped[:6] == [1, 3, 3, 4, 3, 1]  # a leaves after boundary 3, b and c after 4, d after 6
    assert len(steps) == 0 and steps.step() == 0
    for tag, row in rows.items():
        assert left[tag].shape == row["z"].shape
        torch.testing.assert_close(left[tag], _alone(cfm, row), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_dropped_rows_leave_and_full_batches_refuse_more():
    cfm = _cfm()
    steps = RowSteps(cfm, STEPS, torch.device("cpu"), 80, bucket_frames=8, batch_sizes=(1, 2))
    a, b, c = _row(10, 5), _row(12, 6), _row(9, 7)  # one lane (lengths 9-16)
    _join(steps, "a", a)
    _join(steps, "b", b)
    assert steps.room(9) == 0 and steps.room(30) == 2  # another lane has room
    with pytest.raises(ValueError, match="does not fit"):
        _join(steps, "c", c)
    steps.step()
    steps.drop(["b"])
    _join(steps, "c", c)
    finished = {}
    while len(steps):
        steps.step()
        finished.update(steps.leave())
    assert set(finished) == {"a", "c"}
    torch.testing.assert_close(finished["a"], _alone(cfm, a), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(finished["c"], _alone(cfm, c), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="frames"):
        steps.join(["x"], a["z"], a["mu"], a["cond"], a["spks"], [11])


@torch.no_grad()
def test_lanes_keep_short_rows_apart_from_long_ones_and_step_one_at_a_time():
    cfm = _cfm()
    steps = RowSteps(cfm, STEPS, torch.device("cpu"), 80, bucket_frames=8, batch_sizes=(1, 2, 4))
    assert steps.bounds[:5] == (16, 24, 40, 64, 96)
    short, long = _row(10, 8), _row(60, 9)
    _join(steps, "short", short)
    _join(steps, "long", long)
    assert steps.lanes() == {16: ["short"], 64: ["long"]}
    assert steps.step([16]) == 1 and steps.rows_computed == 1  # the short row alone, 16 frames
    finished = {}
    for _ in range(STEPS - 1):
        steps.step([16])
        finished.update(steps.leave())
    assert list(finished) == ["short"] and steps.lanes() == {64: ["long"]}  # the long row never stepped
    for _ in range(STEPS):
        steps.step()
        finished.update(steps.leave())
    for tag, row in (("short", short), ("long", long)):
        torch.testing.assert_close(finished[tag], _alone(cfm, row), atol=2e-5, rtol=1e-4)
