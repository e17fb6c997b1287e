"""The Python examples of docs/API.md's OpenAI-compatible section, run as written against the real servers
(only the address is swapped in), from a folder with the repository's ``resources``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.slow

DOC_URL = "localhost:8888"


def python_examples() -> list[str]:
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- test: python -->\n```python\n(.*?)```", text, flags=re.S)


def test_the_doc_has_examples_of_every_route():
    code = "\n".join(python_examples())
    for call in ("chat.completions.create", "stream=True", '"audio": {"id"', "realtime.connect", "input_audio"):
        assert call in code


@pytest.mark.parametrize(
    "example", python_examples(), ids=lambda code: re.sub(r"\W+", "-", code[:300].split("create(")[0])[-40:]
)
def test_doc_example_runs(web, tmp_path, example):
    (tmp_path / "resources").symlink_to(ROOT / "resources")
    code = example.replace(DOC_URL, web.url.removeprefix("http://"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip(), "the example printed nothing"
    for name in ("answer.wav", "streamed.wav"):
        if name in example:
            import soundfile as sf

            info = sf.info(str(tmp_path / name))
            assert info.samplerate == 24_000 and info.channels == 1 and info.frames > 0
