"""Device and dtype names: one resolver, clear errors, and command lines whose choices come from it."""

from __future__ import annotations

import os

import pytest
import torch

from glm4voice import devices
from glm4voice.devices import DeviceError, decoder_dtype, default_device, llm_dtypes, resolve_device, torch_dtype
from glm4voice.llm.engine import EngineConfig


def _choices(parser, flag: str):
    return next(action.choices for action in parser._actions if flag in action.option_strings)


def test_auto_and_none_mean_the_default_device(monkeypatch):
    assert resolve_device("auto") == resolve_device(None) == torch.device(default_device())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda:0"


@pytest.mark.parametrize(
    "name, words",
    [("gpu", "cuda, cuda:N or cpu"), ("cuda:x", "cuda, cuda:N or cpu"), ("meta", "cuda, cuda:N or cpu"), ("", "cuda")],
)
def test_malformed_or_foreign_device_names_are_explained(name, words):
    with pytest.raises(DeviceError, match=words):
        resolve_device(name)


def test_cuda_is_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no usable CUDA GPU"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="only 2 CUDA devices"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert issubclass(DeviceError, ValueError)


def test_decoder_dtypes():
    assert decoder_dtype("auto", "cpu") is torch.float32
    assert decoder_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert decoder_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="decoder dtype"):
        decoder_dtype("int8", "cpu")
    assert ("auto", *devices.DECODER_DTYPES) == devices.DECODER_DTYPE_CHOICES
    assert [torch_dtype(name) for name in devices.FLOAT_DTYPES] == [torch.float32, torch.bfloat16, torch.float16]


def test_llm_dtypes_are_exactly_what_the_engine_builds():
    for name in llm_dtypes():
        assert EngineConfig(dtype=name).dtype == name
    assert {"int8", "fp8", "int4"} <= set(llm_dtypes())
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")


def test_command_lines_take_their_choices_from_the_resolver():
    import model_server
    import web_demo
    from glm4voice import launch
    from glm4voice.server.settings import ServerSettings

    assert _choices(model_server.build_parser(), "--dtype") == llm_dtypes()
    assert _choices(web_demo.build_parser(), "--decoder-dtype") == devices.DECODER_DTYPE_CHOICES
    assert _choices(launch.build_parser(), "--dtype") == llm_dtypes()
    with pytest.raises(ValueError, match="dtype must be one of"):
        ServerSettings(dtype="int3")


def test_the_web_demo_refuses_a_bad_device_with_a_usage_message(capsys):
    import web_demo

    with pytest.raises(SystemExit) as exited:
        web_demo.main(["--device", "tpu:0"])
    assert exited.value.code == 2
    assert "--device tpu:0" in capsys.readouterr().err


def test_the_servers_prefer_expandable_segments_unless_the_user_chose(monkeypatch):
    """model_server.py and web_demo.py start torch's CUDA allocator with expandable segments (freed memory
    goes back to the driver page by page); a PYTORCH_CUDA_ALLOC_CONF of the user's own is left alone."""
    import model_server
    import web_demo

    for main in (model_server.main, web_demo.main):  # set first, before either refuses its bad device
        monkeypatch.delenv(devices.ALLOCATOR_ENV, raising=False)
        with pytest.raises(SystemExit):
            main(["--device", "tpu:0"])
        assert os.environ[devices.ALLOCATOR_ENV] == devices.EXPANDABLE_SEGMENTS
    monkeypatch.setenv(devices.ALLOCATOR_ENV, "max_split_size_mb:512")
    devices.prefer_expandable_segments()
    assert os.environ[devices.ALLOCATOR_ENV] == "max_split_size_mb:512"
