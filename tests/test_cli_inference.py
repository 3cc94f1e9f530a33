"""`lalm chat` and `lalm generate` on a tiny checkpoint (in process through lalm.__main__.main,
plus one real subprocess for the exit code and one-line error).

Run: .venv/bin/pytest -x -q tests/test_cli_inference.py
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import soundfile as sf

pytest.importorskip("transformers")
from hf_reference import waveform

from lalm.__main__ import main
from lalm.cli.chat import interactive

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


@pytest.fixture
def wavs(tmp_path):
    (tmp_path / "audio").mkdir()
    for name, sec, seed in (("a.wav", 1.2, 1), ("b.flac", 2.0, 2)):
        sf.write(tmp_path / "audio" / name, waveform(sec, seed), 16000)
    (tmp_path / "audio" / "bad.wav").write_text("not audio")
    return tmp_path


def answer(tiny, content, **kw):
    (r,) = tiny.generate([{"role": "user", "content": content}], temperature=0, max_new_tokens=12, **kw)
    return r


def test_chat_one_turn_streams_the_answer(tiny, wavs, capsys):
    wav = str(wavs / "audio" / "a.wav")
    assert main(["chat", "--model", str(tiny.path), "--audio", wav, "--prompt", "What is it?", *GREEDY]) == 0
    expected = answer(tiny, [{"type": "audio", "audio": wav}, {"type": "text", "text": "What is it?"}])
    assert capsys.readouterr().out == expected.text + "\n"


def test_chat_json_voice_only(tiny, wavs, capsys):
    wav = str(wavs / "audio" / "b.flac")
    assert main(["chat", "--model", str(tiny.path), "--audio", wav, "--json", *GREEDY]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = answer(tiny, [{"type": "audio", "audio": wav}])
    assert out == expected.to_dict() and out["audio_tokens"] > 0


def test_chat_empty_system_is_an_empty_system_turn(tiny, wavs, capsys):
    """--system '' used to give the template's default system prompt ('' is falsy)."""
    wav = str(wavs / "audio" / "a.wav")
    assert main(["chat", "--model", str(tiny.path), "--audio", wav, "--system", "", "--json", *GREEDY]) == 0
    out = json.loads(capsys.readouterr().out)
    audio = [{"type": "audio", "audio": wav}]
    (empty,) = tiny.generate([{"role": "system", "content": ""}, {"role": "user", "content": audio}],
                             temperature=0, max_new_tokens=12)
    assert out == empty.to_dict()
    assert out["prompt_tokens"] < answer(tiny, audio).prompt_tokens  # no 'You are a helpful assistant.'


def test_chat_and_generate_take_num_beams(tiny, wavs, capsys):
    wav = str(wavs / "audio" / "a.wav")
    content = [{"type": "audio", "audio": wav}, {"type": "text", "text": "What is it?"}]
    beams = ["--num-beams", "3", "--length-penalty", "0.5"]
    expected = answer(tiny, content, num_beams=3, length_penalty=0.5)
    assert expected.token_ids != answer(tiny, content).token_ids  # the flags must reach the search
    assert main(["chat", "--model", str(tiny.path), "--audio", wav, "--prompt", "What is it?", *GREEDY, *beams]) == 0
    assert capsys.readouterr().out == expected.text + "\n"
    inp, out = wavs / "in.jsonl", wavs / "out.jsonl"
    _jsonl(inp, [{"id": "q", "messages": [{"role": "user", "content": content}]}])
    args = ["generate", "--model", str(tiny.path), "--input", str(inp), "--output", str(out), *GREEDY, *beams]
    assert main(args) == 0
    assert json.loads(out.read_text()) == {"id": "q", **expected.to_dict()}
    assert main(["chat", "--model", str(tiny.path), "--audio", wav, "--temperature", "0.5", "--num-beams", "2"]) == 2
    assert "cannot be combined with temperature=0.5" in capsys.readouterr().err


@pytest.mark.parametrize("audio, words", [("missing.wav", "not found"), ("bad.wav", "cannot decode")])
def test_chat_bad_audio_is_one_line_and_exit_2(tiny, wavs, capsys, audio, words):
    code = main(["chat", "--model", str(tiny.path), "--audio", str(wavs / "audio" / audio), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err


def test_chat_error_from_a_real_process(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "lalm", "chat", "--model", str(tiny.path), "--audio",
                        str(tmp_path / "nope.wav")], capture_output=True, text=True, timeout=120,
                       check=False)
    assert p.returncode == 2 and p.stderr.startswith("lalm chat: error:") and p.stderr.count("\n") == 1


def test_interactive_session(tiny, wavs):
    wav = str(wavs / "audio" / "a.wav")
    out, err = io.StringIO(), io.StringIO()
    lines = [f"/audio {wav}", "", "And now?", "/audio missing.wav", "/reset", "Hello", "/exit", "never read"]
    interactive(tiny, iter(lines), out, err, {"temperature": 0, "max_new_tokens": 12})
    voice = [{"role": "user", "content": [{"type": "audio", "audio": wav}]}]
    first = tiny.generate(voice, temperature=0, max_new_tokens=12)[0].text
    second = tiny.generate([*voice, {"role": "assistant", "content": first},
                            {"role": "user", "content": [{"type": "text", "text": "And now?"}]}],
                           temperature=0, max_new_tokens=12)[0].text
    fresh = answer(tiny, [{"type": "text", "text": "Hello"}]).text
    assert out.getvalue() == f"{first}\n{second}\n{fresh}\n"
    assert "missing.wav: file not found" in err.getvalue() and "reset" in err.getvalue()


def test_interactive_says_reset_when_the_conversation_outgrows_the_context(tiny):
    out, err = io.StringIO(), io.StringIO()
    long = "hello " * tiny.config.text.max_position_embeddings
    interactive(tiny, iter([long, "Hello", long, "/exit"]), out, err, {"temperature": 0, "max_new_tokens": 4})
    first, second = err.getvalue().split("error: ")[1:]
    assert "/reset" not in first  # alone too long: nothing to reset
    assert "/reset to start over" in second  # with a history: every later turn would fail too


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_generate_jsonl_bad_lines_and_restart(tiny, wavs, capsys):
    good = {
        "q1": [{"role": "user", "content": [{"type": "audio", "audio": "audio/a.wav"},
                                            {"type": "text", "text": "Describe."}]}],
        "q2": [{"role": "user", "content": "Just text, please."}],
        "q3": [{"role": "user", "content": [{"type": "audio", "audio": "audio/b.flac"}]}],
    }
    inp, out = wavs / "in.jsonl", wavs / "sub" / "out.jsonl"
    _jsonl(inp, [{"id": "q1", "messages": good["q1"]}, "{not json",
                 {"id": "q2", "messages": good["q2"]},
                 {"id": 7, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "audio/bad.wav"}]}]},
                 {"id": "q3", "messages": good["q3"]}, {"id": "no-messages"}])
    args = ["generate", "--model", str(tiny.path), "--input", str(inp), "--output", str(out),
            "--batch-size", "2", *GREEDY]
    assert main(args) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_id = {d["id"]: d for d in lines}
    assert len(lines) == 6 and set(by_id) == {"q1", "q2", "q3", "line 2", 7, "no-messages"}
    assert "invalid JSON" in by_id["line 2"]["error"] and "cannot decode" in by_id[7]["error"]
    assert "messages" in by_id["no-messages"]["error"]
    for k, conv in good.items():
        resolved = json.loads(json.dumps(conv).replace('"audio/', f'"{wavs}/audio/'))
        (r,) = tiny.generate(resolved, temperature=0, max_new_tokens=12)
        assert by_id[k] == {"id": k, **r.to_dict()}
        assert list(by_id[k]) == ["id", "text", "token_ids", "logprobs", "prompt_tokens", "audio_tokens",
                                  "finish_reason"]
    # Restart: the answered ids are kept, the error lines tried again (still failing: one line each).
    answered = [x for x in out.read_text().splitlines() if "error" not in json.loads(x)]
    assert main(args) == 0
    again = out.read_text().splitlines()
    assert again[:3] == answered and {json.loads(x)["id"] for x in again[3:]} == {"line 2", 7, "no-messages"}
    # The bad audio fixed: its id is answered now, in place of its error.
    sf.write(wavs / "audio" / "bad.wav", waveform(1.0, 3), 16000)
    assert main(args) == 0
    by_id = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert len(out.read_text().splitlines()) == 6 and "text" in by_id[7]
    # Drop a result (as if interrupted) and cut a line mid-write: q2 is redone, once.
    kept = [x for x in out.read_text().splitlines() if json.loads(x)["id"] != "q2"]
    out.write_text("\n".join(kept) + "\n" + '{"id": "q3", "te')
    assert main(args) == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines() if x != '{"id": "q3", "te']
    assert sorted(map(str, ids)) == sorted(map(str, by_id)) and len(ids) == 6
    assert {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()[-3:]}["q2"] == by_id["q2"]
    # Everything answered but the two malformed lines: they are all that a rerun redoes.
    assert main(args) == 0 and "2 errors, 4 skipped" in capsys.readouterr().err


def test_generate_missing_input_exits_2(tiny, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny.path), "--input", str(tmp_path / "no.jsonl"),
                 "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and "no such input file" in capsys.readouterr().err


def test_generate_resolves_every_audio_form_against_the_input_file(tmp_path):
    """Every way chat.py accepts an audio path (OpenAI's {"audio_url": {"url": ...}} included) is
    resolved against the input file's folder, not the working directory."""
    from lalm.cli.generate import read_input

    forms = [{"type": "audio", "audio": "a.wav"}, {"type": "audio", "audio_url": "a.wav"},
             {"type": "audio_url", "audio_url": {"url": "a.wav"}}, {"type": "audio", "path": "a.wav"},
             {"type": "audio", "url": "a.wav"}, {"type": "audio", "audio": {"url": "a.wav"}}]
    _jsonl(tmp_path / "in.jsonl", [{"id": 1, "messages": [{"role": "user", "content": forms}]}])
    ((_, messages),) = read_input(tmp_path / "in.jsonl")
    from lalm import chat

    assert chat.audios(chat.validate(messages)) == [str(tmp_path / "a.wav")] * len(forms)


@pytest.mark.parametrize("command", ["chat", "generate"])
@pytest.mark.parametrize("flag, value, words", [("--max-new-tokens", "0", "max_new_tokens=0"),
                                                ("--top-p", "1.5", "top_p=1.5"),
                                                ("--temperature", "-1", "temperature=-1")])
def test_bad_decoding_flags_fail_before_the_model_loads(tmp_path, capsys, command, flag, value, words):
    """The model folder does not exist: the flag's error must come first (no multi-GB load to wait for)."""
    inp = tmp_path / "in.jsonl"
    _jsonl(inp, [{"id": 1, "messages": [{"role": "user", "content": "hi"}]}])
    where = {"chat": ["--prompt", "hi"], "generate": ["--input", str(inp), "--output", str(tmp_path / "o.jsonl")]}
    code = main([command, "--model", str(tmp_path / "no-model"), *where[command], flag, value])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "no-model" not in err
