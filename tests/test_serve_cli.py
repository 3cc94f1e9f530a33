"""`lalm serve` as a command: bad options exit 2 with one line; Ctrl-C (SIGINT) lets a
running answer finish before the process exits 0.

Run: .venv/bin/pytest -q tests/test_serve_cli.py
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")


def lalm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lalm", "serve", *args], check=False,
                          capture_output=True, text=True, timeout=120, **kw)


def test_bad_options_exit_2_with_one_line(tmp_path):
    r = lalm("--port", "0")
    assert r.returncode == 2 and "--model PATH is required" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = lalm("--fake", "--allowed-local-media-path", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a folder" in r.stderr


def test_sigint_finishes_the_running_answer():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lalm", "serve", "--fake", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "a long answer please"}],
                "max_tokens": 40, "stream": True}  # the fake takes 20 ms a token
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGINT)  # Ctrl-C while the answer is streaming
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] in ("stop", "length")
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):  # and it stopped listening
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
