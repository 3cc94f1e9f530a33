"""The voice-chat page in a real browser: Debian's chromium driven by Playwright, with a fake
microphone that plays a wav file.

Run: .venv/bin/pytest -q -s tests/test_serve_browser.py   (needs /usr/bin/chromium)
Records a voice turn from the fake mic, sends it, watches the answer stream in, types a
follow-up, uploads a file with a question, and saves a phone-sized screenshot under
artifacts/serve/ (path printed).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api")
sf = pytest.importorskip("soundfile")

from lalm.serve.app import create_app
from lalm.serve.cli import background_server
from lalm.serve.engine import Engine
from lalm.serve.fake import FakeBackend

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "serve"


class RecordingBackend(FakeBackend):
    """The fake model, remembering the conversations it was asked to answer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.conversations: list[list[dict]] = []

    def prepare(self, conversation):
        self.conversations.append(conversation)
        return super().prepare(conversation)


def tone_wav(path: Path, seconds: float = 3.0, rate: int = 48000) -> Path:
    """A warbling tone at 48 kHz: what the fake microphone 'hears' (looped), or an upload."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * (300 + 80 * np.sin(2 * np.pi * 3 * t)) * t)
    sf.write(path, x.astype(np.float32), rate, subtype="PCM_16")
    return path


@contextmanager
def chat_page(tmp_path, backend: FakeBackend, init_script: str | None = None, scale: float = 1):
    """(page, engine, errors): the page loaded and connected, on a phone-sized viewport."""
    engine = Engine(backend, max_batch=4, max_queue=4)
    wav = tone_wav(tmp_path / "mic.wav")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run"]
    with background_server(create_app(engine)) as url, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": 390, "height": 760}, device_scale_factor=scale,
                                          is_mobile=True, has_touch=True)
            if init_script:
                context.add_init_script(init_script)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'fake'")
            yield page, engine, errors
        finally:
            browser.close()


def test_voice_turn_in_chromium(tmp_path):
    backend = RecordingBackend(step_delay_s=0.06, min_tokens=12)
    with chat_page(tmp_path, backend, scale=2) as (page, _engine, errors):
        wav = tmp_path / "mic.wav"

        # Voice turn: record ~1.5 s from the fake mic, then send it with no text.
        page.click("#record")
        page.wait_for_selector("#record.recording")
        page.wait_for_timeout(1500)
        page.click("#record")
        page.wait_for_selector("#attachments audio", timeout=15000)
        page.click("#send")

        answer = page.locator(".turn.assistant .content").first
        seen = []
        deadline = time.monotonic() + 60
        while page.locator(".turn.assistant[data-done='1']").count() == 0:
            assert time.monotonic() < deadline, "no answer"
            text = answer.text_content() or ""
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            page.wait_for_timeout(20)
        final = answer.text_content()
        assert final and "Error" not in final
        assert len(seen) >= 2 and all(final.startswith(s) for s in seen), seen  # streamed
        assert page.locator(".turn.user audio").count() == 1  # the turn keeps its player

        # What reached the server: one audio part, 16 kHz, about as long as the recording.
        (conv,) = backend.conversations
        (part,) = conv[-1]["content"]
        wave = part["audio"]["array"]
        assert part["type"] == "audio" and part["audio"]["sampling_rate"] == 16000
        assert 0.8 < len(wave) / 16000 < 4.0 and float(np.abs(wave).max()) > 0.05

        # A typed follow-up: the history (with the audio) goes along.
        page.fill("#text", "And what else?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".turn.assistant[data-done='1'] >> nth=1", timeout=60000)
        roles = [m["role"] for m in backend.conversations[-1]]
        assert roles == ["user", "assistant", "user"]

        # An uploaded file with a question: a third turn with its own audio player.
        page.set_input_files("#file", str(wav))
        page.wait_for_selector("#attachments audio", timeout=15000)
        page.fill("#text", "Is this the same sound?")
        page.click("#send")
        page.wait_for_selector(".turn.assistant[data-done='1'] >> nth=2", timeout=60000)
        last = backend.conversations[-1][-1]["content"]
        assert [p["type"] for p in last] == ["audio", "text"]
        assert abs(len(last[0]["audio"]["array"]) / 16000 - 3.0) < 0.05  # the whole file
        assert page.locator(".turn.user audio").count() == 2
        assert page.locator(".turn.error").count() == 0 and not errors, errors

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "voice_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")

