"""The quality check (python -m glm4voice.llm.quality): its metrics, its verdicts, and the command on
the tiny checkpoints (int8 against float32 on the CPU; fp8 / int4 refused there with what works)."""

import json
import math

import pytest
import torch

from glm4voice.llm import quality
from glm4voice.llm.quality import compare_next_token, identical_prefix, interleave_kept
from glm4voice.protocol import AUDIO_TOKENS_PER_SEGMENT as A
from glm4voice.protocol import TEXT_TOKENS_PER_SEGMENT as T

from speech_samples import espeak_available

OFFSET = 1000
STOP = frozenset({7})


def answer(*runs: tuple[str, int]) -> list[int]:
    ids = []
    for kind, n in runs:
        ids += [OFFSET + 5 + i for i in range(n)] if kind == "a" else [10 + i for i in range(n)]
    return ids


def test_next_token_comparison():
    logits = torch.randn(6, 50)
    same = compare_next_token(logits, logits.clone())
    assert (same.positions, same.top1_agreement) == (6, 1.0) and same.mean_kl < 1e-6
    shifted = logits.clone()
    shifted[0] = -shifted[0]  # one position's favourite becomes its least likely
    other = compare_next_token(logits, shifted)
    assert other.top1_agreement == pytest.approx(5 / 6) and other.mean_kl > 0.1
    # KL of two known distributions: p = (0.5, 0.5), q = (0.9, 0.1)
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert compare_next_token(p, q).mean_kl == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="positions, vocab"):
        compare_next_token(logits, logits[:3])


def test_identical_prefix():
    assert identical_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert identical_prefix([1, 2], [1, 2, 3]) == 2
    assert identical_prefix([5], [6]) == 0


@pytest.mark.parametrize(
    "runs, kept",
    [
        ([("t", T), ("a", A), ("t", T), ("a", A), ("t", 4), ("a", 60)], True),  # text ends, audio goes on
        ([("t", T), ("a", A), ("t", T), ("a", 11)], True),  # cut by the step budget
        ([("t", T), ("a", A), ("t", 5)], True),  # cut inside a text run
        ([("t", T), ("a", A + 90)], True),  # 13 text tokens in all, then only audio
        ([("t", T + 1), ("a", A)], False),  # 14 text tokens in a row
        ([("t", T), ("a", A - 1), ("t", T)], False),  # a short audio run between text runs
        ([("t", 4), ("a", A), ("t", 3)], False),  # text again after it ended
        ([("a", A), ("t", T)], False),  # starts with audio
        ([], False),
    ],
)
def test_interleave_pattern(runs, kept):
    assert interleave_kept(answer(*runs), OFFSET) is kept
    assert interleave_kept(answer(*runs) + [7] + answer(("t", 40)), OFFSET, STOP) is kept  # after the stop: ignored


def test_verdicts():
    assert quality.verdict(0.99, 0.001) == "PASS"
    assert quality.verdict(0.95, 0.02) == "PASS"
    assert quality.verdict(0.9, 0.001) == "MARGINAL"
    assert quality.verdict(0.99, 0.05) == "MARGINAL"
    assert quality.verdict(0.8, 0.001) == "FAIL"
    assert quality.verdict(0.99, 0.5) == "FAIL"
    assert quality.verdict(1.0, 0.0, interleave_broken=True) == "FAIL"
    result = quality.PromptResult("p", "text", 10, 100, 100, 1.0, 0.0, interleave_reference=True,
                                  interleave_tested=False)  # fmt: skip
    report = quality.QualityReport("int4:tinygemm", "bfloat16", (result,))
    assert result.interleave_broken and report.verdict == "FAIL"
    assert "interleave kept 0/1 where the reference keeps it  FAIL" in report.table()


@pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng")
def test_command_on_the_tiny_checkpoints(tiny_checkpoints, tmp_path, capsys):
    """int8 against float32 on the CPU: every prompt (6 text, 4 spoken) answered and scored; the tiny
    random model's answers keep no interleave, so only top-1 and KL decide."""
    out = tmp_path / "quality.json"
    code = quality.main([
        "--model-path", str(tiny_checkpoints.llm), "--tokenizer-path", str(tiny_checkpoints.speech_tokenizer),
        "--dtype", "int8", "--device", "cpu", "--steps", "24", "--json", str(out),
    ])  # fmt: skip
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["tested"] == "int8:fused" and report["reference"] == "float32"
    prompts = report["prompts"]
    assert [p["kind"] for p in prompts] == ["text"] * len(quality.TEXT_PROMPTS) + ["speech"] * len(
        quality.SPOKEN_PROMPTS
    )
    assert all(0 < p["steps"] <= 24 and 0 <= p["identical_prefix"] <= p["steps"] for p in prompts)
    # the spoken prompts carry the audio tokens of a few seconds of speech (12.5 per second)
    assert all(p["prompt_tokens"] > 190 for p in prompts if p["kind"] == "speech")
    assert report["top1_agreement"] >= 0.9 and report["mean_kl"] < 0.01  # int8 on the tiny model: close
    assert report["verdict"] in ("PASS", "MARGINAL") and code == 0
    assert "int8:fused against float32" in table and table.count("speech ") == len(quality.SPOKEN_PROMPTS)


@pytest.mark.parametrize("dtype", ["fp8", "int4"])
def test_command_refuses_what_the_cpu_cannot_run(tiny_checkpoints, capsys, dtype):
    with pytest.raises(SystemExit) as exit_:
        quality.main(["--model-path", str(tiny_checkpoints.llm), "--dtype", dtype, "--device", "cpu"])
    assert exit_.value.code == 2
    assert f"--dtype {dtype} needs" in capsys.readouterr().err
