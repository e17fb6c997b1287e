"""Regenerate resources/demo_screenshot.png (the README's picture of the page).

    python resources/make_screenshot.py [--port 8898] [--server-port 10998]

Starts the demo exactly as the README does (``python -m glm4voice.launch``: tiny random
checkpoints on CPU unless checkpoint paths are passed after ``--``), asks one spoken question (the
English sample prompt) and one typed question in Debian chromium, and saves the page. Chinese text
needs a CJK font in the system (Debian: ``fonts-wqy-microhei``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser.demo_page import CHROMIUM, DemoPage, chromium_flags

OUT = ROOT / "resources" / "demo_screenshot.png"
MAX_NEW_TOKENS = 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8898)
    parser.add_argument("--server-port", type=int, default=10998)
    args, launch_args = parser.parse_known_args()
    log = Path(tempfile.mkstemp(prefix="launch-", suffix=".log")[1])
    command = [sys.executable, "-m", "glm4voice.launch", "--port", str(args.port), "--server-port", str(args.server_port),
               *[a for a in launch_args if a != "--"]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while "GLM-4-Voice demo: http://" not in log.read_text(errors="replace"):
            if launcher.poll() is not None:
                raise SystemExit(log.read_text(errors="replace"))
            time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=chromium_flags(ROOT / "resources" / "sample_en.wav"))  # fmt: skip
            with tempfile.TemporaryDirectory() as shots:
                page = DemoPage(browser, f"http://127.0.0.1:{args.port}/", Path(shots), "screenshot")
                page.set_max_new_tokens(MAX_NEW_TOKENS)
                page.page.click("#settings button.label-wrap")  # fold the settings away again
                page.pick_example("English")
                page.submit()
                page.wait_turn(1)
                page.text_mode()
                page.type("Tell me a short story about a cat.")
                page.submit()
                page.wait_turn(2)
                page.audio_durations("bot")
                page.page.mouse.move(0, 0)
                page.page.set_viewport_size({"width": 1280, "height": 800})
                page.page.screenshot(path=str(OUT), full_page=True)
                page.close()
            browser.close()
        print(f"wrote {OUT}")
        return 0
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
