import socket

import httpx
import pytest

from support import ServerProcess, free_port


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_process_waits_for_ready_and_stops(tmp_path):
    port = free_port()
    (tmp_path / "health").write_text("ok")
    with ServerProcess(
        ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        ready_url=f"http://127.0.0.1:{port}/health",
    ) as server:
        assert httpx.get(f"http://127.0.0.1:{port}/health").text == "ok"
    assert server.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_server_process_reports_early_exit():
    with pytest.raises(RuntimeError, match="exited"):
        ServerProcess(
            ["python3", "-c", "import sys; print('boom'); sys.exit(3)"], ready_url="http://127.0.0.1:9/"
        ).start()


def test_each_server_process_has_its_own_gradio_folder(tmp_path):
    command = ["python3", "-c", "import os, sys; print(os.environ['GRADIO_TEMP_DIR']); sys.exit(0)"]
    first, second = (ServerProcess(command, ready_url="http://127.0.0.1:9/") for _ in range(2))
    assert first.gradio_temp_dir != second.gradio_temp_dir
    for server in (first, second):
        assert server.env["GRADIO_TEMP_DIR"] == str(server.gradio_temp_dir) and server.gradio_temp_dir.is_dir()
        (server.gradio_temp_dir / "cached.wav").write_bytes(b"x")
        server.stop()
        assert not server.gradio_temp_dir.exists()
