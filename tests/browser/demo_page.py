"""Drive the web demo's page in Debian chromium with Playwright (what a person sees and does)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from playwright.sync_api import Browser, Page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium_flags(fake_microphone_wav: Path) -> list[str]:
    """Headless Debian chromium with a fake microphone that plays ``fake_microphone_wav``."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ]


PLAYER_LEAD_S = 10.0
"""Start-up lead of the page's player in these tests. On a loaded 2-core CI machine the tiny model
and decoder produce speech slower than real time, so with the default 0.15 s lead the player would
(correctly) record underruns, which are a producer-speed matter. A long lead lets every chunk arrive
before its slot, so the tests can demand what the player guarantees: every chunk starts exactly
where the previous one ends."""
WAIT_MS = 120_000
AUDIO_VALUE = "#audio-input a.download-link"
"""Present while the audio input holds a recording or file (its href names the file)."""
PROMPT_TOKENS = re.compile(r"prompt (\d+) tokens")
NOT_RUNNING = "The model server is not running or is restarting"
"""What the page says when the token server is down or restarting."""


class DemoPage:
    """One browser tab on the demo, with screenshots saved under ``artifacts``."""

    def __init__(self, browser: Browser, url: str, artifacts: Path, prefix: str, lead_s: float = PLAYER_LEAD_S):
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page: Page = self.context.new_page()
        self.lead_s = lead_s
        self.page.add_init_script(f"window.GLM4VOICE_PLAYER_LEAD_S = {lead_s};")
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.url = url
        self.artifacts = artifacts
        self.prefix = prefix
        self.page.goto(url)
        self.page.wait_for_selector("#submit", timeout=WAIT_MS)
        self.page.wait_for_function("() => !!window.glm4voicePlayer", timeout=WAIT_MS)

    def close(self) -> None:
        self.context.close()

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{self.prefix}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    # --- controls ------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Until the page has rendered two more frames: updates it had scheduled have been applied."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def set_max_new_tokens(self, n: int, attempts: int = 3) -> None:
        """Type ``n`` into the settings' number box. Gradio applies a component's initial properties
        once more just after it mounts (inside the settings accordion: when it first opens); a value
        typed before that is overwritten, so the value is typed again until it holds."""
        box = self.page.locator("#max-new-tokens input")
        if not box.is_visible():
            self.page.click("#settings button.label-wrap")
        box.wait_for(state="visible", timeout=WAIT_MS)
        values = []
        for _ in range(attempts):
            self.settle()
            box.fill(str(n))
            box.press("Enter")
            self.settle()
            values.append(box.input_value())
            if values[-1] == str(n):
                return
        raise AssertionError(f"the max-new-tokens box did not keep {n}: it read {values}")

    def text_mode(self) -> None:
        self.page.click("#input-mode label:has-text('text')")
        self.page.wait_for_selector("#text-input textarea", state="visible")

    def audio_mode(self) -> None:
        self.page.click("#input-mode label:has-text('audio')")
        self.page.wait_for_selector("#audio-input", state="visible")

    def type(self, text: str) -> None:
        self.page.fill("#text-input textarea", text)

    def submit(self) -> None:
        self.page.click("#submit")

    def clear(self) -> None:
        self.page.click("#clear")

    def stop(self) -> None:
        self.page.click("#stop")

    def stop_visible(self) -> bool:
        return self.page.locator("#stop").is_visible()

    def conversation_mode(self, on: bool) -> None:
        """Switch conversation mode; on: wait until the microphone streams to the server."""
        box = self.page.locator("#conversation-mode input")
        if box.is_checked() != on:
            box.click()
        state = "listening" if on else "off"
        self.page.wait_for_function("s => window.glm4voiceLive.state === s", arg=state, timeout=WAIT_MS)

    def record(self, seconds: float) -> None:
        """Record from chromium's fake microphone (the wav given to chromium_flags, looped)."""
        self.page.click("#audio-input button.record-button")
        self.page.wait_for_timeout(seconds * 1000)
        self.page.click("#audio-input button.stop-button")
        self.page.wait_for_selector(AUDIO_VALUE, state="attached", timeout=WAIT_MS)

    def clear_audio(self) -> None:
        """Remove the audio input's current recording or file (a refused one stays there)."""
        if self.page.locator(AUDIO_VALUE).count():
            self.page.locator("#audio-input button[aria-label='Clear']").first.click()
        self.page.wait_for_selector(AUDIO_VALUE, state="detached", timeout=WAIT_MS)

    def upload(self, path: Path) -> None:
        self.clear_audio()
        with self.page.expect_file_chooser() as chooser:
            self.page.click("#audio-input button[aria-label='Upload file']")
            upload_area = self.page.locator("#audio-input button.center, #audio-input [data-testid='upload']")
            if not chooser.is_done() and upload_area.count():  # some versions need a second click
                upload_area.first.click()
        chooser.value.set_files(str(path))
        self.page.wait_for_selector(f"{AUDIO_VALUE}[href*='{path.name}']", state="attached", timeout=WAIT_MS)

    def pick_example(self, label_start: str) -> None:
        self.clear_audio()
        self.page.click(f"#audio-examples button:has-text('{label_start}')")
        self.page.wait_for_selector(AUDIO_VALUE, state="attached", timeout=WAIT_MS)

    # --- what the page shows --------------------------------------------------------------------------
    def status(self) -> str:
        return self.page.inner_text("#status")

    def wait_status(self, text: str) -> str:
        self.page.wait_for_function(
            "t => document.querySelector('#status').innerText.includes(t)", arg=text, timeout=WAIT_MS
        )
        return self.status()

    def wait_turn(self, number: int) -> str:
        """Wait until turn ``number`` is done or failed (its audio stream, if any, fully received)."""
        self.page.wait_for_function(
            """n => { const s = document.querySelector('#status').innerText;
                      return s.includes(`Turn ${n} · done`) || s.includes(`Turn ${n} failed`); }""",
            arg=number, timeout=WAIT_MS,
        )  # fmt: skip
        status = self.status()
        if f"Turn {number} · done" in status:
            self.page.wait_for_function(
                """() => { const el = document.querySelector('#live-player [data-turn]');
                           const s = window.glm4voicePlayer.stats;
                           return el && s.turn === el.dataset.turn && ['finished', 'error'].includes(s.state); }""",
                timeout=WAIT_MS,
            )  # fmt: skip
        return status

    def prompt_tokens(self) -> int:
        match = PROMPT_TOKENS.search(self.status())
        assert match, self.status()
        return int(match.group(1))

    def player_stats(self) -> dict:
        return json.loads(self.page.evaluate("JSON.stringify(window.glm4voicePlayer.stats)"))

    def heard_seconds(self) -> float:
        """Seconds of the current answer the player has made audible (its own clock)."""
        return self.page.evaluate("window.glm4voicePlayer.heardSeconds(window.glm4voicePlayer.audibleTime())")

    def live(self, name: str):
        """A field of conversation mode's client (window.glm4voiceLive), as JSON data."""
        return json.loads(self.page.evaluate(f"JSON.stringify(window.glm4voiceLive.{name})"))

    def wait_live(self, condition: str, deadline_ms: int = WAIT_MS) -> None:
        """Until ``condition`` (JavaScript, with ``live`` bound to window.glm4voiceLive) holds."""
        self.page.wait_for_function(f"() => {{ const live = window.glm4voiceLive; return {condition}; }}",
                                    timeout=deadline_ms)  # fmt: skip

    def answers_done(self) -> list[str]:
        """Statuses of the answers the live socket saw end, in order."""
        return [e["status"] for e in self.live("events") if e["type"] == "answer_done"]

    def messages(self, role: str) -> list[str]:
        """Texts of the chat bubbles of ``role`` ('user' or 'bot'), in order."""
        return self.page.locator(f"#chat [data-testid='{role}']").all_inner_texts()

    def audio_players(self, role: str) -> int:
        return self.page.locator(f"#chat [data-testid='{role}'] .minimal-audio-player").count()

    def audio_durations(self, role: str) -> list[str]:
        """The players' duration labels ("0:03"), once every player of ``role`` has loaded its file."""
        self.page.wait_for_function(
            """role => Array.from(document.querySelectorAll(
                          `#chat [data-testid='${role}'] .minimal-audio-player .timestamp`))
                       .every(t => t.innerText.trim() !== '0:00')""",
            arg=role, timeout=WAIT_MS,
        )  # fmt: skip
        return self.page.locator(f"#chat [data-testid='{role}'] .minimal-audio-player .timestamp").all_inner_texts()

    def answer_audio_urls(self) -> list[str]:
        links = self.page.locator("#chat .message-buttons-left a.download-link")
        return [links.nth(i).get_attribute("href") for i in range(links.count())]

    def toasts(self) -> list[str]:
        return self.page.locator(".toast-body").all_inner_texts()

    def submit_enabled(self) -> bool:
        return self.page.locator("#submit").is_enabled()
