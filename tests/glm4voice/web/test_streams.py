"""The registry of turn streams bounds itself without ever cutting a turn in flight or a listener."""

from __future__ import annotations

import asyncio

import numpy as np

from glm4voice.audio import OUTPUT_SAMPLE_RATE
from glm4voice.web.streams import AudioStreams


def test_streams_of_turns_in_flight_are_never_dropped():
    streams = AudioStreams(OUTPUT_SAMPLE_RATE, ttl_s=0.0, max_streams=4, max_per_session=2)
    live = streams.open("victim")
    live.push(np.ones(10, np.float32))
    for i in range(300):  # a flood of short turns, each from a new browser session
        streams.open(f"flood-{i}").close()
    assert streams.get(live.id) is live and not live.closed
    live.push(np.ones(10, np.float32))  # the turn goes on writing
    assert len(streams) <= 4 + 1


def test_each_browser_session_keeps_a_few_streams_and_drops_its_own_oldest_first():
    streams = AudioStreams(OUTPUT_SAMPLE_RATE, max_streams=100, max_per_session=2)
    others = streams.open("other")
    others.close()
    mine = []
    for _ in range(5):
        mine.append(streams.open("mine"))
        mine[-1].close()
    assert [streams.get(s.id) is not None for s in mine] == [False, False, False, True, True]
    assert streams.get(others.id) is others
    running = [streams.open("busy") for _ in range(3)]  # a browser with three tabs, all mid-answer
    assert all(streams.get(s.id) is s for s in running)


def test_a_finished_stream_that_is_being_listened_to_is_kept_over_the_total_cap():
    async def scenario():
        streams = AudioStreams(OUTPUT_SAMPLE_RATE, max_streams=2)
        heard = streams.open()
        heard.push(np.ones(5, np.float32))
        frames = heard.frames()
        first = await anext(frames)  # a slow listener: reading, not finished
        heard.push(np.ones(7, np.float32))
        heard.close()
        idle = streams.open()
        idle.close()
        newest = streams.open()
        kept = streams.get(heard.id) is heard and streams.get(idle.id) is None
        rest = [frame async for frame in frames]
        assert streams.get(newest.id) is newest
        return kept, first, rest

    kept, first, rest = asyncio.run(scenario())
    assert kept and len(first) == 4 + 2 * 5 and len(rest) == 1
