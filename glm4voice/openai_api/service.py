"""What the OpenAI-compatible routes share: the pipeline, the answer store, the VAD model, the settings."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from glm4voice.conversation.vad import SileroVAD
from glm4voice.defaults import RETRY_AFTER_S
from glm4voice.openai_api.store import DEFAULT_MAX_ENTRIES, DEFAULT_TTL_S, AudioStore
from glm4voice.pipeline import VoiceChat

API_PREFIX = "/v1"
"""Every route of the OpenAI-compatible API is under this path."""
MODEL_ID = "glm-4-voice-9b"
"""The one model id the API serves (``GET /v1/models``; ``model`` of every request)."""
MODEL_OWNER = "zai-org"
MAX_REQUEST_BYTES = 64 << 20
"""Largest chat completion body (base64 audio included): a 120 s stereo 48 kHz wav is ~31 MB."""
MAX_EVENT_BYTES = 4 << 20
"""Largest realtime client event (an append of ~65 s of 24 kHz pcm16); larger ones get an error event."""


@dataclass(frozen=True)
class ApiSettings:
    model_id: str = MODEL_ID
    audio_ttl_s: int = DEFAULT_TTL_S
    """How long an answer can be cited by its audio id (``expires_at``)."""
    max_stored_answers: int = DEFAULT_MAX_ENTRIES
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_event_bytes: int = MAX_EVENT_BYTES
    retry_after_s: int = RETRY_AFTER_S
    """``Retry-After`` of a 503 (the token server's own default)."""

    def __post_init__(self) -> None:
        if min(self.audio_ttl_s, self.max_stored_answers, self.max_request_bytes, self.max_event_bytes) < 1:
            raise ValueError(f"invalid API settings: {self}")


class OpenAIService:
    """One per app (kept in ``app.state.openai``)."""

    def __init__(self, chat: VoiceChat, settings: ApiSettings = ApiSettings()):
        self.chat = chat
        self.settings = settings
        self.store = AudioStore(settings.audio_ttl_s, settings.max_stored_answers)
        self.created = int(time.time())
        self._vad: SileroVAD | None = None
        self._vad_lock = asyncio.Lock()
        self.sessions = 0
        """Realtime sessions open now."""

    async def vad(self) -> SileroVAD:
        """The VAD model, loaded at the first realtime session."""
        async with self._vad_lock:
            if self._vad is None:
                self._vad = await SileroVAD.load()
            return self._vad

    def close(self) -> None:
        if self._vad is not None:
            self._vad.close()
