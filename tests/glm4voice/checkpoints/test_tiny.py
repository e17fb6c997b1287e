import filecmp
import json
import subprocess
import sys

from glm4voice.checkpoints import DECODER_FOLDER, LLM_FOLDER, SPEECH_TOKENIZER_FOLDER, write_tiny_checkpoints
from glm4voice.checkpoints.text import padded_vocab_size, published_special_layout
from glm4voice.text_tokenizer import GLMTokenizer

from support import ROOT


def test_published_layout_numbers():
    layout = published_special_layout(151329)
    assert layout["<|endoftext|>"] == 151329 and layout["[gMASK]"] == 151331 and layout["<sop>"] == 151333
    assert layout["<|user|>"] == 151336 and layout["<|begin_of_audio|>"] == 151343
    assert layout["<|audio_0|>"] == 152353 and "<|audio_16383|>" not in layout
    assert layout["<|audio_16382|>"] == 152353 + 16382
    assert padded_vocab_size(151329) == 168960


def test_tiny_folders_have_published_names(tiny_checkpoints):
    assert tiny_checkpoints.llm.name == LLM_FOLDER == "glm-4-voice-9b"
    assert tiny_checkpoints.speech_tokenizer.name == SPEECH_TOKENIZER_FOLDER == "glm-4-voice-tokenizer"
    assert tiny_checkpoints.decoder.name == DECODER_FOLDER == "glm-4-voice-decoder"
    config = json.loads((tiny_checkpoints.llm / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ChatGLM4Tokenizer" and config["eos_token"] == "<|endoftext|>"
    tokenizer = GLMTokenizer.from_pretrained(tiny_checkpoints.llm)
    assert tokenizer.token_to_id("<|audio_0|>") == tiny_checkpoints.vocab.audio_offset


def test_cli_writes_deterministic_checkpoints(tmp_path):
    for name in ("a", "b"):
        result = subprocess.run(
            [sys.executable, "-m", "glm4voice.checkpoints", "tiny", str(tmp_path / name), "--seed", "3"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "glm-4-voice-9b" in result.stdout and "random weights" in result.stdout, result.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    expected_files = {
        LLM_FOLDER: {
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "tokenizer.model",
            "tokenizer_config.json",
        },
        SPEECH_TOKENIZER_FOLDER: {"config.json", "model.safetensors", "preprocessor_config.json"},
        DECODER_FOLDER: {"config.yaml", "flow.pt", "hift.pt"},
    }
    for folder, files in expected_files.items():
        names = sorted(p.name for p in (a / folder).iterdir())
        assert files <= set(names), (folder, names)
        assert names == sorted(p.name for p in (b / folder).iterdir())
        match, mismatch, errors = filecmp.cmpfiles(a / folder, b / folder, names, shallow=False)
        assert not mismatch and not errors, (folder, mismatch, errors)


def test_written_in_process_equals_cli_seed(tmp_path):
    first = write_tiny_checkpoints(tmp_path / "x", seed=0)
    second = write_tiny_checkpoints(tmp_path / "y", seed=0)
    assert first.vocab == second.vocab
    assert (first.llm / "tokenizer.model").read_bytes() == (second.llm / "tokenizer.model").read_bytes()
