"""The voice-chat page's defects found in review, each checked in a real browser (Debian's
chromium driven by Playwright, fake microphone), as tests/test_serve_browser.py does.

Run: .venv/bin/pytest -q tests/test_serve_browser_audit.py   (needs /usr/bin/chromium)
"""

from __future__ import annotations

import json
import time

from test_serve_browser import (  # its marks and skips (chromium, playwright) apply here too
    RecordingBackend,
    chat_page,
    pytestmark,  # noqa: F401
    tone_wav,
)


def set_max_tokens(page, n: int) -> None:
    # The field sits in the collapsed Settings panel.
    page.evaluate(f"document.getElementById('max-tokens').value = '{n}'")


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_stop_button_ends_the_answer_and_frees_the_row(tmp_path):
    # Before: the Send button was only disabled while an answer streamed; nothing could stop
    # a long answer, and nothing else could be sent until it ended.
    backend = RecordingBackend(step_delay_s=0.05, min_tokens=10_000)  # runs to max_tokens
    with chat_page(tmp_path, backend) as (page, engine, errors):
        set_max_tokens(page, 400)  # 20 s of answer
        page.fill("#text", "Tell me a long story")
        page.dblclick("#send")  # a double-tap sends once and does not stop it at once
        page.wait_for_function(
            "(document.querySelector('.turn.assistant .content') || {}).textContent?.length > 10")
        assert len(backend.conversations) == 1 and page.locator(".turn.assistant").count() == 1
        assert page.locator(".turn.assistant[data-done='1']").count() == 0
        assert page.text_content("#send") == "Stop"
        page.wait_for_timeout(700)  # a second tap within 0.5 s of Send is a double-tap, not Stop
        page.click("#send", timeout=3000)
        page.wait_for_selector(".turn.assistant[data-done='1']", timeout=5000)
        # The connection closed, so the server cancelled the row long before its 400 tokens.
        wait_until(lambda: engine.load == (0, 0), 5, f"row still held: {engine.load}")
        assert page.locator(".turn.error").count() == 0
        assert "stopped" in page.text_content(".turn.assistant .meta")
        assert page.text_content("#send") == "Send"
        partial = page.text_content(".turn.assistant .content")

        # The next turn goes out, with the stopped answer (as shown) in its history.
        set_max_tokens(page, 5)
        page.fill("#text", "Shorter, please")
        page.click("#send")
        page.wait_for_selector(".turn.assistant[data-done='1'] >> nth=1", timeout=30000)
        conv = backend.conversations[-1]
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        assert conv[1]["content"] == partial
        assert not errors, errors


def test_new_conversation_mid_answer_does_not_leak_into_the_next(tmp_path):
    # Before: "New conversation" cleared the history while an answer still streamed; when it
    # ended, that answer was pushed into the new, empty history (a stray assistant turn the
    # next request sent along), and the server kept generating it.
    backend = RecordingBackend(step_delay_s=0.05, min_tokens=10_000)
    with chat_page(tmp_path, backend) as (page, engine, errors):
        set_max_tokens(page, 200)  # 10 s of answer
        page.fill("#text", "First conversation")
        page.click("#send")
        page.wait_for_function(
            "(document.querySelector('.turn.assistant .content') || {}).textContent?.length > 5")
        page.click("#settings summary")
        page.click("#reset")
        wait_until(lambda: engine.load == (0, 0), 5, f"row still held: {engine.load}")
        page.wait_for_function("!state.busy", timeout=5000)
        assert page.evaluate("state.messages.length") == 0
        set_max_tokens(page, 5)
        page.fill("#text", "Second conversation")
        page.click("#send")
        page.wait_for_selector(".turn.assistant[data-done='1']", timeout=30000)
        assert [m["role"] for m in backend.conversations[-1]] == ["user"]
        assert not errors, errors


def test_enter_that_confirms_an_ime_composition_does_not_send(tmp_path):
    # Before: the Enter key that commits a Chinese/Japanese IME composition sent the message.
    backend = RecordingBackend(min_tokens=4)
    with chat_page(tmp_path, backend) as (page, _engine, errors):
        page.fill("#text", "你好")
        page.evaluate("""() => document.getElementById('text').dispatchEvent(new KeyboardEvent(
            'keydown', {key: 'Enter', code: 'Enter', isComposing: true, bubbles: true,
                        cancelable: true}))""")
        page.wait_for_timeout(500)
        assert page.locator(".turn.user").count() == 0 and not backend.conversations
        assert page.input_value("#text") == "你好"
        page.focus("#text")
        page.keyboard.press("Enter")  # an ordinary Enter still sends
        page.wait_for_selector(".turn.assistant[data-done='1']", timeout=30000)
        assert backend.conversations[-1][-1]["content"] == [{"type": "text", "text": "你好"}]
        assert not errors, errors


SLOW_DECODE = """
(() => {
  const decode = BaseAudioContext.prototype.decodeAudioData;
  BaseAudioContext.prototype.decodeAudioData = function (...a) {
    return new Promise((r) => setTimeout(r, 1500)).then(() => decode.apply(this, a));
  };
})();
"""


def test_send_does_not_leave_unready_audio_behind(tmp_path):
    # Before: Send while a file was still being decoded (or while recording) sent the typed
    # question without its audio; the audio turned up afterwards as an attachment.
    backend = RecordingBackend(min_tokens=4)
    with chat_page(tmp_path, backend, init_script=SLOW_DECODE) as (page, _engine, errors):
        page.set_input_files("#file", str(tone_wav(tmp_path / "upload.wav", 2.0)))
        page.fill("#text", "What is this sound?")
        page.click("#send")
        page.wait_for_timeout(300)
        assert page.locator(".turn.user").count() == 0 and not backend.conversations
        assert "processing" in page.text_content("#status")
        page.wait_for_selector("#attachments audio", timeout=15000)
        page.click("#send")
        page.wait_for_selector(".turn.assistant[data-done='1']", timeout=30000)
        assert [p["type"] for p in backend.conversations[-1][-1]["content"]] == ["audio", "text"]

        # Send while the microphone is still recording: the recording is not dropped either.
        page.click("#record")
        page.wait_for_selector("#record.recording")
        page.fill("#text", "And this one?")
        page.click("#send")
        page.wait_for_timeout(300)
        assert len(backend.conversations) == 1 and page.locator(".turn.user").count() == 1
        assert "recording" in page.text_content("#status")
        page.wait_for_timeout(800)
        page.click("#record")
        page.wait_for_selector("#attachments audio", timeout=15000)
        page.click("#send")
        page.wait_for_selector(".turn.assistant[data-done='1'] >> nth=1", timeout=30000)
        last = backend.conversations[-1][-1]["content"]
        assert [p["type"] for p in last] == ["audio", "text"] and last[1]["text"] == "And this one?"
        assert not errors, errors


TRACK_STREAMS = """
(() => {
  window.__streams = [];
  const gum = MediaDevices.prototype.getUserMedia;
  MediaDevices.prototype.getUserMedia = async function (...a) {
    const s = await gum.apply(this, a);
    window.__streams.push(s);
    return s;
  };
})();
"""


def test_double_tap_on_record_opens_one_microphone(tmp_path):
    # Before: a second tap while getUserMedia was pending opened a second stream whose
    # recorder was forgotten: the microphone stayed on after the recording was stopped.
    backend = RecordingBackend(min_tokens=4)
    with chat_page(tmp_path, backend, init_script=TRACK_STREAMS) as (page, _engine, errors):
        page.evaluate("() => { const b = document.getElementById('record'); b.click(); b.click(); }")
        page.wait_for_selector("#record.recording")
        page.wait_for_timeout(800)
        page.click("#record")
        page.wait_for_selector("#attachments audio", timeout=15000)
        live = page.evaluate(
            "window.__streams.flatMap(s => s.getTracks()).filter(t => t.readyState !== 'ended').length")
        assert page.evaluate("window.__streams.length") == 1 and live == 0
        assert not errors, errors


NO_MIC_INSECURE = """
Object.defineProperty(navigator, 'mediaDevices', {value: undefined, configurable: true});
Object.defineProperty(window, 'isSecureContext', {value: false, configurable: true});
"""


def test_microphone_on_a_plain_http_page_says_why(tmp_path):
    # Browsers hide navigator.mediaDevices from insecure pages (http://<LAN address>, e.g. a
    # phone on the same network). Before: "microphone unavailable: Cannot read properties of
    # undefined (reading 'getUserMedia')".
    backend = RecordingBackend(min_tokens=4)
    with chat_page(tmp_path, backend, init_script=NO_MIC_INSECURE) as (page, _engine, errors):
        page.click("#record")
        page.wait_for_function("document.getElementById('status').textContent.length > 0")
        status = page.text_content("#status")
        assert "HTTPS" in status and "upload" in status, status
        assert page.locator("#record.recording").count() == 0
        assert not errors, errors


FAKE_SSE = """
(() => {
  // Answers /v1/chat/completions with window.__sse = {status, text, piece}: `text` sent in
  // `piece`-byte reads, so events, 'data:' prefixes and UTF-8 characters split across reads.
  const real = window.fetch;
  window.fetch = function (url, opts) {
    if (!String(url).includes("/v1/chat/completions") || !window.__sse) return real.apply(this, arguments);
    const { status, text, piece } = window.__sse;
    const bytes = new TextEncoder().encode(text);
    let at = 0;
    const body = new ReadableStream({
      async pull(ctl) {
        await new Promise((r) => setTimeout(r, 5));
        if (at >= bytes.length) { ctl.close(); return; }
        ctl.enqueue(bytes.slice(at, at + piece)); at += piece;
      },
    });
    return Promise.resolve(new Response(body, { status,
      headers: { "Content-Type": status === 200 ? "text/event-stream" : "application/json" } }));
  };
})();
"""


def _sse(*objs) -> str:
    return "".join(f"data: {json.dumps(o, ensure_ascii=False)}\n\n" for o in objs) + "data: [DONE]\n\n"


def _delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def test_stream_parsing_split_reads_error_events_and_http_errors(tmp_path):
    # A guard, not a fix: this passed before the review too.
    backend = RecordingBackend(min_tokens=4)
    with chat_page(tmp_path, backend, init_script=FAKE_SSE) as (page, _engine, errors):
        def turn(sse: dict, n: int) -> tuple[str, bool]:
            page.evaluate("s => { window.__sse = s; }", sse)
            page.fill("#text", f"question {n}")
            page.click("#send")
            done = page.locator(".turn.assistant[data-done='1']").nth(n)
            done.wait_for(timeout=15000)
            return done.locator(".content").text_content(), "error" in done.get_attribute("class")

        text = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                    _delta("Hé"), _delta("llo 世界 "), _delta("🎧"),
                    {"choices": [], "usage": {"total_tokens": 3}})
        for n, piece in enumerate([1, 7, 4096]):
            assert turn({"status": 200, "text": text, "piece": piece}, n) == ("Héllo 世界 🎧", False)
        # An error event mid-stream is shown, with what came before it.
        bad = _sse(_delta("partial"), {"error": {"message": "engine stopped", "code": None}})
        answer, failed = turn({"status": 200, "text": bad, "piece": 5}, 3)
        assert failed and "partial" in answer and "engine stopped" in answer
        # A non-200 answer shows the server's message.
        busy = '{"error": {"message": "The queue is full; retry later", "type": "x"}}'
        answer, failed = turn({"status": 429, "text": busy, "piece": 4096}, 4)
        assert failed and "queue is full" in answer
        # Only the answered turns are in the history.
        roles = page.evaluate("state.messages.map(m => m.role)")
        assert roles == ["user", "assistant"] * 3
        assert not errors, errors
