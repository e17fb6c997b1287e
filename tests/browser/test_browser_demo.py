"""Browser tests of the web demo: the REAL token server (model_server.py, recording its prompts) and
web_demo.py processes on loopback ports (tiny checkpoints, CPU), driven in Debian chromium by Playwright.

Screenshots of every state go to the artifacts folder (``test-artifacts/browser/``).
"""

from __future__ import annotations

import io
import math
import re

import httpx
import numpy as np
import pytest
import soundfile as sf

from glm4voice.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE, encode_wav
from glm4voice.client import TokenClient
from glm4voice.protocol import Conversation, SpecialTokens, TextInput

from browser.demo_page import CHROMIUM, NOT_RUNNING, WAIT_MS, DemoPage, chromium_flags
from browser.servers import SERVER_SLOTS
from support import ROOT

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SAMPLE_EN = ROOT / "resources" / "sample_en.wav"
"""espeak-ng: "Hello! Can you tell me a short story about a cat, please?" (resources/make_samples.sh)."""
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_flags(SAMPLE_EN))
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, stack, shots, request):
    pages: list[DemoPage] = []

    def open_(name: str | None = None) -> DemoPage:
        page = DemoPage(browser, stack.web_url, shots, name or request.node.name.removeprefix("test_"))
        page.set_max_new_tokens(MAX_NEW_TOKENS)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


def fresh_prompt_tokens(tiny_checkpoints, text: str) -> int:
    from glm4voice.text_tokenizer import GLMTokenizer

    tokenizer = GLMTokenizer.from_pretrained(tiny_checkpoints.llm)
    return len(Conversation(tokenizer, SpecialTokens.from_tokenizer(tokenizer)).prompt_for(TextInput(text)))


def answer_samples(url: str) -> int:
    """Samples of the answer wav the chat offers for download."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, url
    info = sf.info(io.BytesIO(response.content))
    assert info.samplerate == OUTPUT_SAMPLE_RATE and info.channels == 1
    return info.frames


def assert_gapless(stats: dict, expected_samples: int) -> None:
    """The player's own record: every chunk started exactly where the previous one ended, no
    underrun, and the chunks add up to the whole decoded answer."""
    assert stats["state"] == "finished" and stats["error"] is None, stats
    assert stats["contextRate"] == OUTPUT_SAMPLE_RATE  # no resampling at the seams
    assert stats["frames"] >= 2, stats  # streamed in several chunks, not as one file
    assert stats["underruns"] == 0 and stats["seamGaps"] == 0, stats
    starts, durations = stats["starts"], stats["durations"]
    half_sample = 0.5 / OUTPUT_SAMPLE_RATE
    for i in range(1, len(starts)):
        assert abs(starts[i] - (starts[i - 1] + durations[i - 1])) < half_sample, (i, starts, durations)
    assert stats["samples"] == expected_samples
    assert sum(durations) == pytest.approx(expected_samples / OUTPUT_SAMPLE_RATE, abs=len(durations) * half_sample)


def duration_seconds(text: str) -> int:
    minutes, seconds = text.strip().split(":")
    return 60 * int(minutes) + int(seconds)


# --- (a) text turn --------------------------------------------------------------------------------------


def test_text_turn_shows_streamed_text_and_a_playable_answer(open_page, stack, tiny_checkpoints):
    page = open_page()
    assert "Random weights" in page.page.inner_text("#random-weights-notice")
    page.shot("01-start")
    page.text_mode()
    page.type("Tell me a short story about a cat.")
    page.submit()
    page.page.wait_for_function("() => window.glm4voicePlayer.stats.frames >= 1", timeout=120_000)
    page.shot("02-first-audio-chunk")  # usually mid-answer: text streaming, speech started
    status = page.wait_turn(1)
    durations = page.audio_durations("bot")
    page.shot("03-answered")
    assert "Turn 1 · done" in status, status
    assert page.messages("user")[0].strip() == "Tell me a short story about a cat."
    bot = page.messages("bot")
    assert bot and bot[0].strip() and bot[0].strip() != "…"  # the streamed text replaced the placeholder
    assert page.prompt_tokens() == fresh_prompt_tokens(tiny_checkpoints, "Tell me a short story about a cat.")
    # the complete answer as an ordinary audio player with a non-zero duration
    assert page.audio_players("bot") == 1 and duration_seconds(durations[0]) >= 1
    urls = page.answer_audio_urls()
    assert len(urls) == 1
    assert_gapless(page.player_stats(), answer_samples(urls[0]))
    assert page.page.input_value("#text-input textarea") == ""  # the input is cleared for the next turn


# --- (b) voice turn and (c) the second turn sees the history ------------------------------------------


def test_voice_turn_from_the_microphone_then_a_second_turn_sees_the_history(open_page):
    page = open_page()
    page.record(4.0)
    page.shot("01-recorded")
    page.submit()
    status = page.wait_turn(1)
    user_durations, bot_durations = page.audio_durations("user"), page.audio_durations("bot")
    page.shot("02-voice-answered")
    assert "Turn 1 · done" in status, status
    heard = re.search(r"heard ([\d.]+) s of speech \((\d+) speech tokens\)", status)
    assert heard, status
    seconds, tokens = float(heard.group(1)), int(heard.group(2))
    assert 3.0 <= seconds <= 8.0 and abs(tokens - seconds * SPEECH_TOKEN_RATE) <= 2
    assert page.audio_players("user") == 1 and duration_seconds(user_durations[0]) >= 3
    assert page.audio_players("bot") == 1 and duration_seconds(bot_durations[0]) >= 1
    first_prompt = page.prompt_tokens()
    assert_gapless(page.player_stats(), answer_samples(page.answer_audio_urls()[0]))

    page.text_mode()
    page.type("And then?")
    page.submit()
    status = page.wait_turn(2)
    assert all(duration_seconds(d) >= 1 for d in page.audio_durations("bot"))
    page.shot("03-second-turn")
    assert "Turn 2 · done" in status, status
    # the second prompt holds the whole first turn (prompt + answer) and the new question
    assert page.prompt_tokens() > first_prompt + 2
    assert len(page.messages("user")) == 2 and page.audio_players("bot") == 2
    assert_gapless(page.player_stats(), answer_samples(page.answer_audio_urls()[1]))


# --- (d) the server goes away mid-conversation and comes back -----------------------------------------


def test_server_stopped_mid_conversation_shows_an_error_and_recovers(open_page, stack):
    page = open_page()
    page.text_mode()
    page.type("Hello")
    page.submit()
    assert "Turn 1 · done" in page.wait_turn(1)
    history_after_turn_1 = page.prompt_tokens()

    stack.server.stop()
    try:
        page.type("Are you there?")
        page.submit()
        status = page.wait_turn(2)
        page.shot("01-server-down")
        assert "Turn 2 failed" in status and NOT_RUNNING in status and "busy" not in status, status
        assert any(NOT_RUNNING in t for t in page.toasts()) or "model_server.py" in status
        assert page.submit_enabled()  # the page is not stuck
        assert NOT_RUNNING in page.messages("bot")[-1]
    finally:
        stack.server.start()

    page.type("Are you back?")
    page.submit()
    status = page.wait_turn(3)
    page.audio_durations("bot")
    page.shot("02-recovered")
    assert "Turn 3 · done" in status, status
    # the failed turn is not in the history: turn 3's prompt extends turn 1's conversation only
    assert page.prompt_tokens() > history_after_turn_1
    assert page.audio_players("bot") == 2
    assert_gapless(page.player_stats(), answer_samples(page.answer_audio_urls()[-1]))


# --- every other failure: readable, and the next turn works -------------------------------------------


def test_bad_inputs_and_a_busy_server_get_readable_messages(open_page, stack, tmp_path, tiny_checkpoints):
    page = open_page()
    page.text_mode()
    page.submit()
    assert "Please type a message first" in page.wait_turn(1)
    page.shot("01-empty-text")

    page.audio_mode()
    silent = tmp_path / "silence.wav"
    silent.write_bytes(encode_wav(np.zeros(INPUT_SAMPLE_RATE * 2, np.float32), INPUT_SAMPLE_RATE))
    page.upload(silent)
    page.submit()
    assert "No speech detected" in page.wait_turn(2)
    page.shot("02-no-speech")

    too_long = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    too_long.write_bytes(encode_wav(0.1 * rng.standard_normal(8000 * 125).astype(np.float32), 8000))
    page.upload(too_long)
    page.submit()
    assert "too long" in page.wait_turn(3)
    page.shot("03-too-long")

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
    page.upload(corrupt)
    page.submit()
    assert "Unsupported or corrupt audio file" in page.wait_turn(4)
    page.shot("04-corrupt")

    # every stream of the server busy: 503, said so in the page
    holders = [TokenClient(stack.server_url) for _ in range(SERVER_SLOTS)]
    streams = [
        h.stream(prompt="Keep talking.", max_new_tokens=3000, temperature=1.0, top_p=1.0, seed=5) for h in holders
    ]
    try:
        for stream in streams:
            next(stream)
        page.pick_example("English")
        page.submit()
        status = page.wait_turn(5)
        page.audio_durations("user")
        page.shot("05-busy")
        assert "Turn 5 failed" in status and "busy" in status, status
    finally:
        for stream, holder in zip(streams, holders):
            stream.close()
            holder.close()

    # after all that, a spoken sample prompt works
    page.pick_example("English")
    page.submit()
    status = page.wait_turn(6)
    page.audio_durations("bot")
    page.shot("06-example-answered")
    assert "Turn 6 · done" in status, status
    expected = math.ceil(sf.info(str(SAMPLE_EN)).duration * SPEECH_TOKEN_RATE)
    assert f"({expected} speech tokens)" in status
    # rejected inputs never reached the chat; the busy turn shows the question and the error
    assert len(page.messages("user")) == 2 and "busy" in page.messages("bot")[0]
    assert page.audio_players("bot") == 1


def test_clear_resets_and_tabs_do_not_share_history(open_page, tiny_checkpoints):
    fresh = fresh_prompt_tokens(tiny_checkpoints, "Hi")
    tab_a, tab_b = open_page("tab-a"), open_page("tab-b")
    for tab in (tab_a, tab_b):
        tab.text_mode()
    tab_a.type("Hi")
    tab_a.submit()
    assert "Turn 1 · done" in tab_a.wait_turn(1)
    tab_a.type("Hi")
    tab_a.submit()
    assert "Turn 2 · done" in tab_a.wait_turn(2)
    assert tab_a.prompt_tokens() > fresh

    tab_b.type("Hi")
    tab_b.submit()
    assert "Turn 1 · done" in tab_b.wait_turn(1)
    tab_b.shot("01-other-tab")
    assert tab_b.prompt_tokens() == fresh  # tab B never saw tab A's history
    assert len(tab_b.messages("user")) == 1

    # Clear in the middle of a long answer: the turn is cancelled, the page and the history reset
    tab_a.set_max_new_tokens(1000)
    tab_a.type("Tell me a long story.")
    tab_a.submit()
    tab_a.wait_status("Turn 3 · prompt")
    tab_a.clear()
    tab_a.page.wait_for_function(
        "() => document.querySelectorAll('#chat [data-testid=\"user\"]').length === 0", timeout=WAIT_MS
    )
    tab_a.page.wait_for_function("() => document.querySelector('#status').innerText.trim() === ''", timeout=WAIT_MS)
    tab_a.shot("02-cleared")
    assert tab_a.player_stats()["state"] in ("stopped", "finished")
    tab_a.set_max_new_tokens(MAX_NEW_TOKENS)
    tab_a.audio_mode()  # switching modes back and forth keeps the page working
    tab_a.text_mode()
    tab_a.type("Hi")
    tab_a.submit()
    status = tab_a.wait_turn(4)
    assert "Turn 4 · done" in status, status
    assert tab_a.prompt_tokens() == fresh  # Clear started a new conversation
    assert len(tab_a.messages("user")) == 1
    for tab in (tab_a, tab_b):
        assert not [e for e in tab.console_errors if "glm4voice" in e], tab.console_errors
