"""The web demo's HTTP API called the way a script calls it: the REAL ``web_demo.py`` process on a
loopback port (tiny checkpoints, CPU) in front of ``tests/server/scripted_server.py`` (the token
server's app around scripted answers, which a test can hold in flight, or turn into a server whose
engine stopped), driven with httpx against ``/gradio_api/...``.

What a hostile or careless script must not be able to do (issue 19, items 1-7): read the server's
files through a turn, freeze the page, blow up its memory, make it fetch from the network or learn
its paths, cut another user's answer, or get "busy" when the model server is actually gone.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from glm4voice.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, encode_wav
from glm4voice.client import TokenClient
from glm4voice.web.page import PAGE_OUTPUTS
from glm4voice.web.streams import DEFAULT_MAX_STREAMS, decode_frames
from glm4voice.web.uploads import SESSION_COOKIE

from server.scripted_server import HELD_ANSWER_TOKENS
from support import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

SAMPLE_EN = ROOT / "resources" / "sample_en.wav"
SLOTS = 8
"""The scripted token server's streams: more than the page ever runs at once in these tests."""
WAIT_S = 180.0
"""Deadline for one answer on a loaded 2-core machine (not a speed check)."""
API_OUTPUTS = tuple(name for name in PAGE_OUTPUTS if name != "session")
"""The outputs of ``/gradio_api/call/respond`` (the tab's state stays on the server)."""
STATUS, LIVE_PLAYER, CHAT = (API_OUTPUTS.index(name) for name in ("status", "live_player", "chat"))
REFUSED = "did not upload"


# --- a script's client of the page ----------------------------------------------------------------------


def file_data(path: str | None) -> dict | None:
    return None if path is None else {"path": path, "meta": {"_type": "gradio.FileData"}}


class PageAPI:
    """One script's client of the page: one ``httpx.Client``, which keeps the page's session cookie."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=WAIT_S)

    def close(self) -> None:
        self.http.close()

    def upload(self, data: bytes, name: str) -> str:
        response = self.http.post("/gradio_api/upload", files={"files": (name, data, "audio/wav")})
        assert response.status_code == 200, response.text
        (path,) = response.json()
        return path

    def submit(self, *, text: str = "", audio: str | None = None, max_new_tokens: int = 40) -> httpx.Response:
        mode = "text" if audio is None else "audio"
        body = {"data": [mode, file_data(audio), text, 0.2, 0.8, max_new_tokens]}
        return self.http.post("/gradio_api/call/respond", json=body)

    def join_queue(self, audio: str) -> httpx.Response:
        """The page's own route: ``/gradio_api/queue/join`` with the inputs of Submit."""
        config = self.http.get("/config").json()
        fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "respond")
        body = {"data": ["audio", file_data(audio), "", 0.2, 0.8, 40, None], "fn_index": fn_index,
                "session_hash": "scripted0001", "event_data": None, "trigger_id": None}  # fmt: skip
        return self.http.post("/gradio_api/queue/join", json=body)

    def events(self, started: httpx.Response) -> Iterator[tuple[str, Any]]:
        """The (event, data) pairs of a started call, as they arrive."""
        assert started.status_code == 200, started.text
        event_id = started.json()["event_id"]
        with self.http.stream("GET", f"/gradio_api/call/respond/{event_id}") as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    yield event, json.loads(line.removeprefix("data:"))

    def turn(self, **inputs) -> str:
        """One whole turn: its last status line (an error event fails the test)."""
        return last_status(self.events(self.submit(**inputs)))


def last_status(events) -> str:
    status = None
    for event, data in events:
        assert event != "error", data
        if isinstance(data, list) and isinstance(data[STATUS], str):
            status = data[STATUS]
    assert status is not None
    return status


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, (response.status_code, response.text[:500])
    assert REFUSED in response.json()["detail"]


def speech(seconds: float = 2.0, seed: int = 0) -> bytes:
    """A loud, speech-like noise burst (the tiny speech tokenizer hears anything above silence)."""
    rng = np.random.default_rng(seed)
    return encode_wav((0.3 * rng.standard_normal(int(seconds * INPUT_SAMPLE_RATE))).astype(np.float32), 16000)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# --- processes --------------------------------------------------------------------------------------------


class Trap:
    """A loopback listener that records the first bytes of every connection (the page's proxy: any
    outbound request of the page process lands here instead of on the network)."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(10)
                try:
                    seen.append(self.request.recv(4096).decode("latin-1"))
                except OSError:
                    seen.append("")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def token_server(tiny_checkpoints):
    port = free_port()
    args = [str(ROOT / "tests/server/scripted_server.py"), "--host", "127.0.0.1", "--port", str(port),
            "--model-path", str(tiny_checkpoints.llm), "--device", "cpu", "--max-concurrent-streams", str(SLOTS),
            "--max-queue", "0"]  # fmt: skip
    with ServerProcess(args, f"http://127.0.0.1:{port}/health") as server:
        server.url = f"http://127.0.0.1:{port}"
        yield server


@pytest.fixture(scope="module")
def trap():
    trap = Trap()
    yield trap
    trap.close()


def web_demo_args(tiny_checkpoints, server_url: str, port: int) -> list[str]:
    return [str(ROOT / "web_demo.py"), "--port", str(port), "--server-url", server_url,
            "--model-path", str(tiny_checkpoints.llm), "--tokenizer-path", str(tiny_checkpoints.speech_tokenizer),
            "--flow-path", str(tiny_checkpoints.decoder), "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def page(tiny_checkpoints, token_server, trap):
    port = free_port()
    proxy = {name: trap.url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")}
    env = {**proxy, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # the token server stays direct
    args = [*web_demo_args(tiny_checkpoints, token_server.url, port), "--host", "127.0.0.1"]
    with ServerProcess(args, f"http://127.0.0.1:{port}/", timeout=300, env=env) as web:
        web.url = f"http://127.0.0.1:{port}"
        yield web


@pytest.fixture
def api(page):
    clients: list[PageAPI] = []

    def new() -> PageAPI:
        clients.append(PageAPI(page.url))
        return clients[-1]

    yield new
    for client in clients:
        client.close()


# --- the page's own flow works for scripts ------------------------------------------------------------


def test_a_script_uploads_a_question_then_asks_it(api, page):
    client = api()
    path = client.upload(SAMPLE_EN.read_bytes(), "question.wav")
    assert client.http.cookies.get(SESSION_COOKIE)  # the page's session cookie ties the upload to this client
    assert Path(path).is_relative_to(page.gradio_temp_dir)  # this process's own Gradio folder (tests/support.py)
    status = client.turn(audio=path)
    assert "Turn 1 · done · heard" in status, status
    assert "Turn 1 · done" in client.turn(text="Hello")


# --- item 1: only this browser session's uploads ----------------------------------------------------------


def test_files_this_session_did_not_upload_are_refused_before_they_are_read(api, page, tiny_checkpoints, tmp_path):
    secret = tmp_path / "secret.wav"
    secret.write_bytes(speech(seed=7))
    owner, other = api(), api()
    theirs = other.upload(speech(seed=8), "theirs.wav")
    mine = owner.upload(speech(seed=9), "mine.wav")
    named = [
        str(secret),  # a readable audio file anywhere on the server
        str(tiny_checkpoints.llm / "config.json"),  # the checkpoints
        str(ROOT / "web_demo.py"),  # the source
        "/etc/passwd",
        theirs,  # another session's recording, in the shared upload folder
        "mine.wav",  # relative: resolved against the server's working directory
        str(Path(mine).parent / ".." / Path(theirs).parent.name / "theirs.wav"),  # a way round to theirs
    ]
    for path in named:
        assert_refused(owner.submit(audio=path))
        assert_refused(owner.join_queue(path))
    # nothing was copied into Gradio's folder
    copies = [p for p in files_under(page.gradio_temp_dir) if p.name in ("secret.wav", "passwd", "config.json")]
    assert not copies and not any(p.read_bytes() == secret.read_bytes() for p in files_under(page.gradio_temp_dir))
    # each session's own upload works for it
    assert "Turn 1 · done · heard" in owner.turn(audio=mine)
    assert "Turn 1 · done · heard" in other.turn(audio=theirs)


# --- items 2 and 4: /dev/zero, and the default address ------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses that listen on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_by_default_the_page_listens_on_this_machine_only_and_dev_zero_cannot_freeze_it(tiny_checkpoints, token_server):
    port = free_port()
    web = ServerProcess(web_demo_args(tiny_checkpoints, token_server.url, port), f"http://127.0.0.1:{port}/",
                        timeout=300)  # fmt: skip  # no --host: the default
    with web:
        client = PageAPI(f"http://127.0.0.1:{port}")
        try:
            answers = [client.submit(audio=path) for path in ("/dev/zero", "/dev/urandom", "/proc/self/fd/0")]
            assert httpx.get(f"{client.url}/config", timeout=WAIT_S).status_code == 200  # the page still answers
            for answer in answers:
                assert_refused(answer)
            assert "Turn 1 · done" in client.turn(text="Still there?")
        finally:
            client.close()
        assert listening_addresses(port) == {"127.0.0.1"}
        web.process.send_signal(signal.SIGTERM)
        code = web.process.wait(timeout=WAIT_S)  # uvicorn shuts down, then ends by the signal it got
        assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in web.log(), web.log()


# --- item 3: a decompression bomb ------------------------------------------------------------------------------


def write_silent_flac(path: Path, seconds: int, channels: int, rate: int) -> None:
    block = np.zeros((rate * 10, channels), np.float32)
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as out:
        for _ in range(seconds // 10):
            out.write(block)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_decompression_bomb_is_refused_without_decoding_it(api, page, tmp_path):
    """5 minutes of 8-channel 48 kHz silence: 0.1 MiB of FLAC, 460 MB once decoded as float32."""
    bomb = tmp_path / "bomb.flac"
    write_silent_flac(bomb, 300, 8, 48000)
    assert bomb.stat().st_size < 2**20
    client = api()
    path = client.upload(bomb.read_bytes(), "bomb.flac")
    pid = page.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak resident memory starts again from now
    before = peak_rss_mib(pid)
    status = client.turn(audio=path)
    assert "Turn 1 failed" in status and "too long" in status and "300.0 s" in status, status
    assert peak_rss_mib(pid) - before < 100, (before, peak_rss_mib(pid))


# --- item 5: no fetches, no server paths -------------------------------------------------------------------------


def test_the_page_fetches_nothing_and_its_errors_name_no_server_path(api, page, trap):
    client = api()
    seen_before = len(trap.seen)
    answers = []
    for url in ("http://localhost:9/question.wav", "https://example.com/question.wav"):
        started = client.submit(audio=url)
        events = client.events(started) if started.is_success else ()
        answers.append((started, started.text + "".join(json.dumps(data) for _, data in events)))
    assert trap.seen[seen_before:] == []  # not even a DNS question (a proxy sees every request the page makes)
    for started, text in answers:
        assert started.status_code == 403 and REFUSED in text, text
    started = client.submit(audio="no-such-file.wav")
    assert started.status_code == 403
    # a file of its own that has gone since (Gradio deletes old uploads): the message names the file only
    path = client.upload(speech(), "gone.wav")
    Path(path).unlink()
    status = client.turn(audio=path)
    assert "Turn 1 failed" in status and "gone.wav" in status, status
    for text in (started.text, status):
        for server_path in (str(ROOT), os.getcwd(), str(page.gradio_temp_dir), "/tmp"):
            assert server_path not in text, text


# --- item 6: a flood of turns never cuts someone else's answer ------------------------------------------------


def test_a_flood_of_short_turns_never_cuts_an_answer_in_flight(api, page, token_server):
    listener = api()
    events = listener.events(listener.submit(text="Tell me a long story.", max_new_tokens=HELD_ANSWER_TOKENS))
    stream_url = None
    for _, data in events:  # until the turn's audio stream is announced
        html = data[LIVE_PLAYER] if isinstance(data, list) else None
        if isinstance(html, str) and 'data-stream="' in html:
            stream_url = html.split('data-stream="')[1].split('"')[0]
            break
    assert stream_url, "no live player"
    received, first_frame = bytearray(), threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{page.url}/{stream_url}", timeout=WAIT_S) as response:
            for chunk in response.iter_bytes():
                received.extend(chunk)
                first_frame.set()
        first_frame.set()

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    assert first_frame.wait(WAIT_S) and received, "the held answer streamed no audio"

    turns = DEFAULT_MAX_STREAMS + 24  # more streams than the page keeps in all
    errors: list[str] = []

    def flood(count: int) -> None:
        client = PageAPI(page.url)
        try:
            for _ in range(count):
                client.http.cookies.clear()  # a new browser session every time: the worst case
                status = client.turn(text="Hi", max_new_tokens=1)
                if "Turn 1 · done" not in status:
                    errors.append(status)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(error))
        finally:
            client.close()

    workers = [threading.Thread(target=flood, args=(turns // 3,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=20 * WAIT_S)
    assert not errors and not any(w.is_alive() for w in workers), errors[:3]

    httpx.post(f"{token_server.url}/test/release", timeout=WAIT_S)  # the held answer goes on to its end
    rest = list(events)
    status = last_status(rest)
    assert "Turn 1 · done" in status, status
    reader.join(timeout=WAIT_S)
    assert not reader.is_alive()
    files = [part["file"] for m in rest[-1][1][CHAT] for part in m["content"] if part.get("type") == "file"]
    wav = listener.http.get(files[-1]["url"])  # the whole answer, as the chat offers it
    streamed = sum(len(frame) for frame in decode_frames(bytes(received)))
    assert streamed == sf.info(io.BytesIO(wav.content)).frames > OUTPUT_SAMPLE_RATE


# --- item 7 (the page's side): a model server that is gone, restarting, or busy ---------------------------------


def wait_until_idle(server_url: str) -> None:
    with httpx.Client(timeout=WAIT_S) as client:
        for _ in range(int(WAIT_S * 10)):
            if client.get(f"{server_url}/health").json()["active_streams"] == 0:
                return
            threading.Event().wait(0.1)
    raise AssertionError("the token server never became idle")


def test_the_page_tells_a_stopped_or_restarting_model_server_from_a_busy_one(api, token_server):
    client = api()
    not_running = "The model server is not running or is restarting"
    # its engine stopped: every request gets 503, and /health says the engine stopped
    httpx.post(f"{token_server.url}/test/engine", json={"running": False}, timeout=WAIT_S)
    try:
        status = client.turn(text="Hi")
    finally:
        httpx.post(f"{token_server.url}/test/engine", json={"running": True}, timeout=WAIT_S)
    assert "Turn 1 failed" in status and not_running in status and "busy" not in status, status
    assert "Turn 1 · done" in client.turn(text="Hi")

    # every stream in use: busy, and it says when to try again
    holders = [TokenClient(token_server.url) for _ in range(SLOTS)]
    streams = [h.stream(prompt="Keep talking.", max_new_tokens=HELD_ANSWER_TOKENS) for h in holders]
    try:
        for stream in streams:
            next(stream)
        status = client.turn(text="Hi")
    finally:
        for stream, holder in zip(streams, holders):
            stream.close()
            holder.close()
    assert "Turn 1 failed" in status and "busy" in status and "try again" in status, status
    wait_until_idle(token_server.url)

    # the process is gone (or restarting), then back
    token_server.stop()
    try:
        status = client.turn(text="Hi")
    finally:
        token_server.start()
    assert "Turn 1 failed" in status and not_running in status and "busy" not in status, status
    assert "Turn 1 · done" in client.turn(text="Hi")
