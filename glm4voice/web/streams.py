"""Per-turn audio streams of the web demo: decoded PCM from the turn's handler to the page's player.

The handler of a turn opens a :class:`TurnAudioStream` in the app's :class:`AudioStreams`
registry (an unguessable id), pushes each decoded chunk into it and closes it at the end of the
turn. ``GET {STREAM_PATH}/{id}`` (``stream_route``) answers with the turn's frames from the first
one on, then each new frame as it is pushed, and ends when the stream is closed. A frame is a
little-endian uint32 sample count followed by that many little-endian int16 samples at the
decoder's rate (the format ``glm4voice/web/player.js`` reads).

Cleanup is explicit: a session discards its previous turn's stream when it starts a new turn,
on Clear, and when the session ends. The registry also bounds itself whenever a stream is opened
(no background task), and never at the expense of a turn in flight: a stream that is still being
written (its turn runs) is never dropped. Each browser session keeps at most
``max_per_session`` streams (its own oldest finished ones go first); over ``max_streams`` in all,
the oldest finished streams that nobody is reading go; finished streams older than ``ttl_s`` go.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from glm4voice.audio import PCM_DTYPE, to_pcm16

logger = logging.getLogger(__name__)

STREAM_PATH = "/glm4voice/stream"
"""URL path of the turn streams (a turn's stream is ``STREAM_PATH/<id>``)."""
FRAME_HEADER = struct.Struct("<I")
DEFAULT_TTL_S = 15 * 60.0
DEFAULT_MAX_STREAMS = 256
"""Finished streams kept at once in all (each holds at most one answer's PCM: ~7 MB for 2000 tokens);
streams of turns in flight come on top (as many as turns run at once)."""
DEFAULT_MAX_PER_SESSION = 8
"""Streams one browser session keeps (a tab holds one at a time; a browser may have a few tabs)."""


def encode_frame(samples: np.ndarray) -> bytes:
    """One frame of float samples in [-1, 1] (clipped) as int16 PCM."""
    pcm = to_pcm16(samples)
    return FRAME_HEADER.pack(len(pcm)) + pcm.tobytes()


def decode_frames(data: bytes) -> list[np.ndarray]:
    """Frames back to int16 arrays (tests and clients in Python)."""
    frames, offset = [], 0
    while offset < len(data):
        if len(data) - offset < FRAME_HEADER.size:
            raise ValueError("truncated frame header")
        (count,) = FRAME_HEADER.unpack_from(data, offset)
        offset += FRAME_HEADER.size
        end = offset + count * PCM_DTYPE.itemsize
        if end > len(data):
            raise ValueError("truncated frame")
        frames.append(np.frombuffer(data[offset:end], dtype=PCM_DTYPE))
        offset = end
    return frames


class TurnAudioStream:
    """The frames of one turn; readers replay them from the start and follow new ones."""

    def __init__(self, stream_id: str, sample_rate: int, session: str | None = None):
        self.id = stream_id
        self.sample_rate = sample_rate
        self.session = session
        """The browser session whose turn writes it (None: unknown)."""
        self.created = time.monotonic()
        self._frames: list[bytes] = []
        self._samples = 0
        self._closed = False
        self._readers = 0
        self._wakeup = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def in_use(self) -> bool:
        """Its turn still writes it, or a listener is still reading it."""
        return not self._closed or self._readers > 0

    def push(self, samples: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError(f"audio stream {self.id} is closed")
        if len(samples) == 0:
            return
        self._frames.append(encode_frame(samples))
        self._samples += len(samples)
        self._wake()

    def close(self) -> None:
        """No more frames: readers get the rest and end."""
        if not self._closed:
            self._closed = True
            self._wake()

    def discard(self) -> None:
        """Close and free the frames (readers stop at once)."""
        self._frames = []
        self.close()

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def frames(self) -> AsyncIterator[bytes]:
        sent = 0
        self._readers += 1
        try:
            while True:
                wakeup = self._wakeup  # taken before looking, so a push after the look wakes us
                frames = self._frames
                while sent < len(frames):
                    yield frames[sent]
                    sent += 1
                    frames = self._frames
                if self._closed:
                    return
                await wakeup.wait()
        finally:
            self._readers -= 1


class AudioStreams:
    """The app's registry of turn streams (one per app, held by the app: no module globals)."""

    def __init__(
        self,
        sample_rate: int,
        ttl_s: float = DEFAULT_TTL_S,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_per_session: int = DEFAULT_MAX_PER_SESSION,
    ):
        self.sample_rate = sample_rate
        self.ttl_s = ttl_s
        self.max_streams = max_streams
        self.max_per_session = max_per_session
        self._streams: OrderedDict[str, TurnAudioStream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, session: str | None = None) -> TurnAudioStream:
        """A new stream for a turn of browser session ``session`` (None: a session of its own)."""
        self._expire()
        if session is not None:
            self._bound_session(session)
        self._bound_total()
        stream = TurnAudioStream(secrets.token_urlsafe(24), self.sample_rate, session)
        self._streams[stream.id] = stream
        return stream

    def get(self, stream_id: str) -> TurnAudioStream | None:
        return self._streams.get(stream_id)

    def discard(self, stream_id: str | None) -> None:
        if stream_id is None:
            return
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.discard()

    def discard_all(self) -> None:
        for stream_id in list(self._streams):
            self.discard(stream_id)

    def _expire(self) -> None:
        now = time.monotonic()
        for stream_id, stream in list(self._streams.items()):
            if stream.closed and now - stream.created > self.ttl_s:
                self.discard(stream_id)

    def _bound_session(self, session: str) -> None:
        """Make room for one more stream of ``session``: its own oldest finished streams go."""
        own = [s for s in self._streams.values() if s.session == session]
        for stream in own[: max(0, len(own) - self.max_per_session + 1)]:
            if stream.closed:
                self.discard(stream.id)

    def _bound_total(self) -> None:
        """Make room for one more stream: the oldest finished streams that nobody reads go."""
        excess = len(self._streams) - self.max_streams + 1
        if excess <= 0:
            return
        idle = [s for s in self._streams.values() if not s.in_use][:excess]
        for stream in idle:
            self.discard(stream.id)
        if len(idle) < excess:
            logger.warning("%d audio streams are in use (turns in flight or being listened to)", len(self._streams))


def stream_url(stream: TurnAudioStream) -> str:
    """The stream's URL relative to the page (works under any mount path / proxy prefix)."""
    return f"{STREAM_PATH.lstrip('/')}/{stream.id}"


def add_stream_route(app: FastAPI, streams: AudioStreams) -> None:
    """``GET STREAM_PATH/{stream_id}``: the turn's frames as one chunked response."""

    @app.get(STREAM_PATH + "/{stream_id}")
    async def turn_audio(stream_id: str):
        stream = streams.get(stream_id)
        if stream is None:
            return JSONResponse({"detail": "no such audio stream (finished, cleared or expired)"}, status_code=404)
        headers = {
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # proxies: do not hold the chunks back
            "X-Audio-Sample-Rate": str(stream.sample_rate),
            "X-Audio-Format": "frames of uint32le count + int16le mono PCM",
        }
        return StreamingResponse(stream.frames(), media_type="application/octet-stream", headers=headers)
