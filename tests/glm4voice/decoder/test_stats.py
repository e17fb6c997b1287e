from glm4voice.decoder.stats import DecodeStats


def test_a_run_is_the_difference_of_two_snapshots():
    stats = DecodeStats()
    stats.add(blocks=3, graph_rows=4, tokens=30, seconds=0.5)  # before the run
    before = stats.snapshot()
    stats.add(blocks=19, graph_rows=32, tokens=19 * 26, seconds=0.2)  # 19 blocks in the batch-32 graph
    stats.add(blocks=1, graph_rows=1, tokens=10, seconds=0.05)
    figures = stats.since(before)
    assert figures == {
        "batches": 2,
        "mean_batch": 10.0,
        "padded_row_share": round(1 - 20 / 33, 3),
        "mean_block_tokens": round((19 * 26 + 10) / 20, 1),
        "busy_s": 0.25,
        "mean_batch_ms": 125.0,
        "phase_s": {},
    }
    assert before.batches == 1  # the snapshot does not move with the counters
    assert DecodeStats().since(DecodeStats())["mean_batch"] is None


def test_phases_count_their_own_time_less_the_phases_inside_them(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 20.0, 20.5])  # flow: 0..10 with the ode 1..3 inside; vocoder 20..20.5
    monkeypatch.setattr("glm4voice.decoder.stats.time.perf_counter", lambda: next(clock))
    stats = DecodeStats()
    before = stats.snapshot()
    with stats.phase("flow"):
        with stats.phase("ode"):
            pass
    with stats.phase("vocoder"):
        pass
    assert stats.since(before)["phase_s"] == {"flow": 8.0, "ode": 2.0, "vocoder": 0.5}
    assert before.phase_s == {}  # the snapshot has its own copy


def test_a_decoded_batch_is_timed_by_phase(tiny_checkpoints):
    from flow_inference import AudioDecoder

    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")
    streams = [decoder.stream(seed=seed) for seed in (1, 2)]
    before = decoder.stats.snapshot()
    decoder.feed_many([(streams[0], list(range(30))), (streams[1], list(range(20)))])  # two first blocks
    decoder.feed_many([(streams[0], list(range(20))), (streams[1], list(range(30)))])  # a mixed batch
    phases = decoder.stats.since(before)["phase_s"]
    assert set(phases) == {"flow", "ode", "vocoder", "to_host"}
    assert all(seconds >= 0 for seconds in phases.values())
