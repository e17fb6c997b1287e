"""The Ray Serve deployment's config and command line (plain data: no Ray cluster, no ray import)."""

from __future__ import annotations

import pytest

from glm4voice.serve.cli import build_parser, config_from_args
from glm4voice.serve.config import (
    ENGINE_DEPLOYMENT,
    SHARED_SPEECH_GPUS,
    Placement,
    ReplicaSpec,
    ServeConfig,
    engine_options,
    gpu_shares,
    ingress_options,
    speech_options,
    speech_pipeline,
)


def config(*argv: str) -> ServeConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_the_cpu_defaults_reserve_nothing_and_fix_the_replica_count():
    cfg = config("--device", "cpu", "--engine-replicas", "2", "--max-concurrent-streams", "4", "--max-queue", "9")
    options = engine_options(cfg)
    assert options["name"] == ENGINE_DEPLOYMENT and options["num_replicas"] == 2
    assert options["max_ongoing_requests"] == 4 and options["max_queued_requests"] == 9
    assert options["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 0.0}
    assert cfg.speech.replicas == 2 and cfg.replica_device == "cpu"
    assert speech_options(cfg)["max_ongoing_requests"] == 8  # web_demo.py's turns on a CPU
    quantized = config("--device", "cpu", "--dtype", "int8", "--quant-method", "torchao").server
    assert quantized.weights == "int8:torchao" and cfg.server.weights == cfg.server.dtype


def test_speech_replicas_do_not_pace_their_turns():
    """Ray Serve's streams do not push back, so a speech replica reads its tokens as they come (pacing
    would only keep its turns open longer); the command line's block sizes still reach its pipeline."""
    from glm4voice.pipeline import PipelineConfig

    assert PipelineConfig().pace_generation  # the web demo's default, which Ray Serve turns off
    assert not ServeConfig().pipeline.pace_generation and not speech_pipeline().pace_generation
    cfg = config("--device", "cpu", "--block-sizes", "12,24")
    assert cfg.pipeline.block_sizes == (12, 24) and not cfg.pipeline.pace_generation
    assert speech_pipeline(pace_generation=True).pace_generation  # a caller may still ask for it


def test_shared_placement_pairs_one_engine_and_one_speech_replica_per_gpu():
    cfg = config("--device", "cuda", "--engine-replicas", "2")
    assert cfg.replica_device == "cuda:0"
    engine, speech = cfg.engine.gpus, cfg.speech.gpus
    assert engine + speech == pytest.approx(1.0) and engine > 0.5 > speech == SHARED_SPEECH_GPUS
    assert speech_options(cfg)["max_ongoing_requests"] == 32


def test_separate_placement_gives_the_speech_side_gpus_of_its_own():
    assert gpu_shares(Placement.SEPARATE) == (1.0, 1.0)
    assert gpu_shares(Placement.SEPARATE, 0.5) == (1.0, 0.5)
    with pytest.raises(ValueError, match="less than half"):
        gpu_shares(Placement.SHARED, 0.5)


def test_a_maximum_above_the_count_autoscales_on_ongoing_requests():
    cfg = config("--device", "cpu", "--engine-replicas", "1", "--max-engine-replicas", "4",
                 "--max-concurrent-streams", "8")  # fmt: skip
    options = engine_options(cfg)
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 1, 4)
    assert scaling["target_ongoing_requests"] == 6.0


def test_the_ingress_holds_far_more_than_the_engines_take():
    cfg = config("--device", "cpu")
    assert ingress_options(cfg)["max_ongoing_requests"] > 10 * cfg.server.max_concurrent_streams


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda:1"], "--device must be cuda or cpu"),
        (["--device", "cpu", "--engine-replicas", "0"], "at least one engine replica"),
        (["--device", "cpu", "--engine-replicas", "3", "--max-engine-replicas", "2"], "replicas <= max_replicas"),
        (["--device", "cpu", "--engine-factory", "no_colon"], "module:function"),
        (["--device", "cpu", "--max-queue", "-1"], "max_queue"),
        (["--device", "cpu", "--dtype", "int8", "--quant-method", "hqq"], "int8 has no method 'hqq'"),
    ],
)
def test_bad_settings_are_refused_with_a_message(argv, message):
    with pytest.raises(ValueError, match=message):
        config(*argv)


def test_replica_specs_are_checked_once():
    with pytest.raises(ValueError):
        ReplicaSpec(replicas=-1)
    with pytest.raises(ValueError):
        ReplicaSpec(gpus=1.5)
    assert ReplicaSpec(2, 2).autoscaled is False and ReplicaSpec(1, 3).autoscaled is True
