"""glm4voice.serve.tokens.RemoteTokenStream on scripted replica streams (no cluster): the token ids in
order, refusals and failures as the token server's, a replica that dies before the first token replaced
by another, and the counters and the board settled whatever ends the stream."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from glm4voice.serve.messages import Accepted, Failed, Refused, Tokens
from glm4voice.serve.tokens import RemoteTokenStream, ReplicaLost, StreamCounters
from glm4voice.server.streaming import EngineRejected

pytestmark = pytest.mark.ray


class ScriptedCall:
    """A replica's stream: its messages, then the end (or an exception, raised where it stands)."""

    def __init__(self, *items):
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self) -> ScriptedCall:
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


def stream_of(*calls: ScriptedCall, counters: StreamCounters | None = None) -> RemoteTokenStream:
    pending = list(calls)
    return RemoteTokenStream(lambda: pending.pop(0), queue_timeout_s=60, counters=counters)


async def drain(stream: RemoteTokenStream) -> list[int]:
    return [token async for token in stream]


def settled(counters: StreamCounters) -> bool:
    return counters.streams_open == 0 and all(e["open"] == 0 for e in counters.board.as_list())


def test_tokens_in_order_and_the_replica_reported():
    counters = StreamCounters()
    call = ScriptedCall(Accepted("r1", {"accepted": 3}), Tokens((5, 6)), Tokens((7,)))
    assert asyncio.run(drain(stream_of(call, counters=counters))) == [5, 6, 7]
    (entry,) = counters.board.as_list()
    assert entry == {"replica": "r1", "reported": {"accepted": 3}, "routed": 1, "open": 0, "lost": False}
    assert settled(counters) and counters.streams_started == 1


def test_a_refusal_and_a_failure_are_the_engines_own():
    counters = StreamCounters()
    refused = stream_of(ScriptedCall(Accepted("r1", {}), Refused(413, "too long", False)), counters=counters)
    with pytest.raises(EngineRejected) as rejected:
        asyncio.run(drain(refused))
    assert (rejected.value.status, rejected.value.text) == (413, "too long")
    failed = stream_of(ScriptedCall(Accepted("r1", {}), Tokens((1,)), Failed("worker died")), counters=counters)
    with pytest.raises(RuntimeError, match="^worker died$"):
        asyncio.run(drain(failed))
    assert settled(counters)


def test_every_replica_busy_is_a_503_that_says_how_many_wait():
    counters = StreamCounters()
    busy = stream_of(ScriptedCall(BackPressureError(num_queued_requests=16, max_queued_requests=16)), counters=counters)
    with pytest.raises(EngineRejected) as rejected:
        asyncio.run(drain(busy))
    assert rejected.value.status == 503 and rejected.value.retry_after
    assert rejected.value.text == "every engine replica is busy and 16 requests are waiting; retry later"
    assert settled(counters) and counters.streams_busy == 1


def test_a_replica_that_dies_before_the_first_token_is_replaced():
    counters = StreamCounters()
    dying = ScriptedCall(Accepted("r1", {}), ActorDiedError())
    living = ScriptedCall(Accepted("r2", {}), Tokens((8, 9)))
    assert asyncio.run(drain(stream_of(dying, living, counters=counters))) == [8, 9]
    entries = {e["replica"]: e for e in counters.board.as_list()}
    assert entries["r1"]["lost"] and not entries["r2"]["lost"]
    assert counters.streams_moved == 1 and settled(counters)


def test_a_replica_that_dies_after_a_token_ends_the_stream_with_a_message():
    counters = StreamCounters()
    stream = stream_of(ScriptedCall(Accepted("r1", {}), Tokens((4,)), ActorDiedError()), counters=counters)
    got: list[int] = []

    async def main():
        async for token in stream:
            got.append(token)

    with pytest.raises(ReplicaLost, match="the engine replica r1 serving this stream stopped after 1 tokens"):
        asyncio.run(main())
    assert got == [4] and counters.streams_lost == 1 and settled(counters)


def test_an_unexpected_error_or_a_cancel_still_settles_the_counters():
    counters = StreamCounters()
    broken = ScriptedCall(Accepted("r1", {}), ValueError("a bug in the replica"))
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(drain(stream_of(broken, counters=counters)))
    assert broken.cancelled and settled(counters)
    held = ScriptedCall(Accepted("r2", {}), Tokens((1,)))
    stream = stream_of(held, counters=counters)

    async def first_then_cancel():
        assert await anext(stream) == 1
        stream.cancel()
        stream.cancel()  # idempotent

    asyncio.run(first_then_cancel())
    assert held.cancelled and settled(counters)


class CancelRaises(ScriptedCall):
    def cancel(self) -> None:
        super().cancel()
        raise RuntimeError("the router could not cancel the request")


def test_a_failing_start_or_cancel_still_settles_the_counters():
    """Starting the call raises (as iterating it can: a full router), or Ray's cancel raises while the
    stream is abandoned: the stream still counts as ended (the ingress's /health went on reporting one
    open stream forever otherwise)."""
    counters = StreamCounters()

    def busy_router():
        raise BackPressureError(num_queued_requests=16, max_queued_requests=16)

    with pytest.raises(EngineRejected) as refused:
        asyncio.run(drain(RemoteTokenStream(busy_router, queue_timeout_s=60, counters=counters)))
    assert refused.value.status == 503 and settled(counters) and counters.streams_busy == 1
    stream = stream_of(CancelRaises(Accepted("r1", {}), Tokens((1, 2))), counters=counters)

    async def first_then_cancel():
        assert await anext(stream) == 1
        stream.cancel()

    with pytest.raises(RuntimeError, match="could not cancel"):
        asyncio.run(first_then_cancel())
    assert settled(counters)
