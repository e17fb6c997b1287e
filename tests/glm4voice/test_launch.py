"""The launcher's LLM options (python -m glm4voice.launch): the quantized dtypes and the number of
conversations at once reach model_server.py, and a dtype the device cannot run is refused before anything starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from glm4voice import launch
from glm4voice.defaults import MAX_CONCURRENT_STREAMS

ROOT = Path(__file__).resolve().parents[2]


def test_server_command_carries_dtype_and_turns():
    args = launch.build_parser().parse_args(["--dtype", "int4", "--max-concurrent-turns", "4"])
    command = launch.server_command(args, "/models/glm-4-voice-9b", "cuda:0", args.dtype)
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--dtype"] == "int4" and flags["--max-concurrent-streams"] == "4"
    assert flags["--model-path"] == "/models/glm-4-voice-9b" and flags["--device"] == "cuda:0"
    # model_server.py accepts what the launcher passes; without --max-concurrent-turns it keeps its default
    from model_server import build_parser as server_parser

    parsed = server_parser().parse_args(command[2:])
    assert (parsed.dtype, parsed.max_concurrent_streams) == ("int4", 4)
    default = launch.server_command(launch.build_parser().parse_args([]), "m", "cpu", "float32")
    assert "--max-concurrent-streams" not in default
    assert server_parser().parse_args(default[2:]).max_concurrent_streams == MAX_CONCURRENT_STREAMS


def test_a_quantization_method_reaches_the_engine_command_while_the_dtype_is_quantized():
    from model_server import build_parser as server_parser

    args = launch.build_parser().parse_args(["--dtype", "int4", "--quant-method", "hqq"])
    command = launch.server_command(args, "m", "cuda:0", args.dtype)
    assert server_parser().parse_args(command[2:]).quant_method == "hqq"
    # random weights on the CPU run in float32: no method goes with them
    assert "--quant-method" not in launch.server_command(args, "m", "cpu", "float32")


@pytest.mark.parametrize(
    "flags, words",
    [(["--dtype", "int8", "--quant-method", "hqq"], "int8 has no method 'hqq' (one of fused, torchao)"),
     (["--quant-method", "hqq"], "needs a quantized dtype (int8, fp8, int4)")],
)  # fmt: skip
def test_a_wrong_quantization_method_is_refused_before_anything_starts(tmp_path, flags, words):
    tiny_dir = tmp_path / "tiny"
    refused = subprocess.run(
        [sys.executable, "-m", "glm4voice.launch", *flags, "--device", "cpu", "--tiny-dir", str(tiny_dir)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and words in refused.stderr, refused.stderr
    assert not tiny_dir.exists()


@pytest.mark.parametrize("dtype", ["fp8", "int4"])
def test_gpu_only_dtypes_are_refused_on_the_cpu_before_anything_starts(tmp_path, dtype):
    tiny_dir = tmp_path / "tiny"
    refused = subprocess.run(
        [sys.executable, "-m", "glm4voice.launch", "--dtype", dtype, "--device", "cpu", "--tiny-dir", str(tiny_dir)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"--dtype {dtype} needs" in refused.stderr and "on the CPU use --dtype int8 or float32" in refused.stderr
    assert not tiny_dir.exists()  # refused before the tiny checkpoints were written or a process started


def test_turns_must_be_positive(tmp_path):
    refused = subprocess.run(
        [sys.executable, "-m", "glm4voice.launch", "--max-concurrent-turns", "0", "--device", "cpu",
         "--tiny-dir", str(tmp_path / "tiny")],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "--max-concurrent-turns must be at least 1" in refused.stderr
