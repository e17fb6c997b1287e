"""Shared fixtures: tiny checkpoints (generated once per session), markers, free ports."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest

from glm4voice.checkpoints import TinyCheckpoints, write_tiny_checkpoints


def pytest_configure(config):
    """Gradio pages made in this process cache files in a folder of their own (GRADIO_TEMP_DIR); the
    default /tmp/gradio is shared with every other process of the machine. Server processes started
    by tests get their own too (support.ServerProcess)."""
    if "GRADIO_TEMP_DIR" not in os.environ:
        config._glm4voice_gradio_dir = tempfile.mkdtemp(prefix="gradio-tests-")
        os.environ["GRADIO_TEMP_DIR"] = config._glm4voice_gradio_dir


def pytest_unconfigure(config):
    folder = getattr(config, "_glm4voice_gradio_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("GRADIO_TEMP_DIR", None)


def pytest_collection_modifyitems(config, items):
    import torch

    has_gpu = torch.cuda.is_available()
    has_browser = shutil.which("chromium") is not None
    require_browser = os.environ.get("GLM4VOICE_REQUIRE_BROWSER") == "1"
    has_ray = importlib.util.find_spec("ray") is not None
    require_ray = os.environ.get("GLM4VOICE_REQUIRE_RAY") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "browser" in item.keywords and not has_browser and not require_browser:
            item.add_marker(pytest.mark.skip(reason="Debian chromium is not installed (scripts/test.sh installs it)"))
        if item.get_closest_marker("ray") and not has_ray and not require_ray:
            item.add_marker(pytest.mark.skip(reason="ray[serve] is not installed (requirements-serve.txt)"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    """The three tiny random checkpoint folders, written once per test session."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-checkpoints"), seed=0)


@pytest.fixture(scope="session")
def text_tokenizer(tiny_checkpoints):
    from glm4voice.text_tokenizer import GLMTokenizer

    return GLMTokenizer.from_pretrained(tiny_checkpoints.llm)


@pytest.fixture(scope="session")
def special_tokens(text_tokenizer):
    from glm4voice.protocol import SpecialTokens

    return SpecialTokens.from_tokenizer(text_tokenizer)


@pytest.fixture
def artifacts_dir():
    """Where tests leave files worth looking at (screenshots, decoded audio)."""
    from pathlib import Path

    path = Path(os.environ.get("GLM4VOICE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
