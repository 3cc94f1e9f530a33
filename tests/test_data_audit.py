"""Data layer audit: manifest lines users write, `lalm data` CLI errors, interrupted builds.

Each test pins a defect that was fixed (see the test's docstring). All run in seconds.

Run: .venv/bin/pytest -q tests/test_data_audit.py
"""

import argparse
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from lalm.__main__ import main
from lalm.data import build as build_mod
from lalm.data import cli
from lalm.data.manifest import audio_paths, read_librispeech, read_manifest, write_jsonl


def _wav(path, seconds=0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000, subtype="PCM_16")
    return path


def _ours(audio="audio/a.wav", answer="hello", **extra):
    return {"id": "x", "source": "espeak-ng:en-us", "task": "asr",
            "messages": [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                      {"type": "text", "text": "Transcribe this audio."}]},
                         {"role": "assistant", "content": answer}],
            "durations": {audio: 0.5}, **extra}


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_malformed_ms_swift_fields_are_skipped_and_counted_not_raised(tmp_path):
    """A wrong type in an ms-swift / LLaMA-Factory field raised TypeError, AttributeError,
    KeyError, IndexError or a bare ValueError out of read_manifest: one odd line stopped
    `lalm data check` (a traceback) and every training run that read the file."""
    _wav(tmp_path / "a.wav")
    tag = [{"role": "user", "content": "<audio>What is this?"}, {"role": "assistant", "content": "x"}]
    bad = [{"messages": 5},                                                     # 1
           {"messages": tag, "audios": 5},                                      # 2
           {"messages": "x", "audios": []},                                     # 3
           {"messages": ["x"], "audios": []},                                   # 4
           {"conversations": ["x"], "audios": []},                              # 5
           {"conversations": 3},                                                # 6
           {"query": "<audio>hi", "history": [["a"]], "audios": ["a.wav"]},     # 7
           {"query": "<audio>hi", "history": 5, "audios": ["a.wav"]},           # 8
           {"messages": [], "rejected_response": "x", "audios": []},            # 9
           {"conversations": [{"from": "human", "value": "<audio>x"}],           # 10
            "chosen": {"from": "gpt"}, "rejected": {"value": "b"}, "audios": ["a.wav"]},
           {"messages": tag, "audios": {"a.wav": 1}}]                           # 11
    good = {"messages": tag, "audios": ["a.wav"]}
    _write(tmp_path / "m.jsonl", bad + [good])
    with pytest.warns(UserWarning, match=f"skipped {len(bad)} line"):
        m = read_manifest(tmp_path / "m.jsonl")
    assert len(m) == 1
    assert [n for n, _ in m.problems] == list(range(1, len(bad) + 1))
    assert all(msg.startswith(f"{tmp_path / 'm.jsonl'}:{n}: ") for n, msg in m.problems)


def test_null_audios_and_history_mean_none(tmp_path):
    """Exports of mixed datasets write null for an absent column; `"audios": null` or
    `"history": null` raised TypeError instead of reading a text-only line."""
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              "audios": None},
             {"query": "hi", "response": "yo", "history": None, "audios": None, "system": None}]
    m = read_manifest(_write(tmp_path / "m.jsonl", lines))
    assert m.problems == [] and len(m) == 2
    assert [x["role"] for x in m[1]["messages"]] == ["user", "assistant"]


def test_llamafactory_openai_style_dpo_answers(tmp_path):
    """LLaMA-Factory's sharegpt with OpenAI-style tags writes chosen/rejected as
    {"role", "content"}: read_manifest raised KeyError('value') (with audios) or refused the
    line as "'chosen' must be a string" (text only)."""
    _wav(tmp_path / "a.wav")

    def answer(t):
        return {"role": "assistant", "content": t}

    lines = [{"messages": [{"role": "user", "content": "<audio>What sound is this?"}],
              "chosen": answer("bell"), "rejected": answer("drum"), "audios": ["a.wav"]},
             {"messages": [{"role": "user", "content": "Capital of France?"}],
              "chosen": answer("paris"), "rejected": answer("rome")}]
    a, b = read_manifest(_write(tmp_path / "d.jsonl", lines))
    assert (a["chosen"], a["rejected"]) == ("bell", "drum")
    assert (b["chosen"], b["rejected"]) == ("paris", "rome")


def test_top_level_system_and_lalm_fields_survive_on_ms_swift_lines(tmp_path):
    """With `messages` + `audios`, a top-level "system" (kept for `conversations` and `query`
    lines) and lalm's own "format" (pre-training: raw or chat) were silently dropped."""
    _wav(tmp_path / "a.wav")
    line = {"messages": [{"role": "user", "content": "<audio>Transcribe."},
                         {"role": "assistant", "content": "go"}],
            "audios": ["a.wav"], "system": "Be brief.", "format": "chat"}
    already = {**line, "messages": [{"role": "system", "content": "Own."}, *line["messages"]]}
    a, b = read_manifest(_write(tmp_path / "s.jsonl", [line, already]))
    assert a["messages"][0] == {"role": "system", "content": "Be brief."}
    assert a["format"] == "chat"
    assert [m["content"] for m in b["messages"] if m["role"] == "system"] == ["Own."]


def test_lines_every_training_stage_refuses_are_reported(tmp_path):
    """`lalm data check` passed lines that chat.validate (every stage) refuses, and DPO lines
    whose prompt ends with an answer (the trainer then appends chosen/rejected after it)."""
    _wav(tmp_path / "audio/a.wav")
    audio_answer = _ours()
    audio_answer["messages"][1]["content"] = [{"type": "audio", "audio": "audio/a.wav"}]
    placeholder = _ours()
    placeholder["messages"][0]["content"][1]["text"] = "What is <|AUDIO|> this?"
    dpo_full = {**_ours(), "chosen": "hello", "rejected": "yellow"}
    dpo_ok = {**_ours(), "chosen": "hello", "rejected": "yellow"}
    dpo_ok["messages"] = dpo_ok["messages"][:1]
    _write(tmp_path / "m.jsonl", [audio_answer, placeholder, dpo_full, dpo_ok])
    with pytest.warns(UserWarning, match="skipped 3 line"):
        m = read_manifest(tmp_path / "m.jsonl")
    assert [n for n, _ in m.problems] == [1, 2, 3] and len(m) == 1
    assert "audio is only allowed in user messages" in m.problems[0][1]
    assert "placeholder" in m.problems[1][1]
    assert "must end with a user turn" in m.problems[2][1]


def test_a_line_that_is_not_utf8_is_skipped_and_a_bom_is_ignored(tmp_path):
    """A Latin-1 line raised UnicodeDecodeError out of read_manifest (a traceback from
    `lalm data check`, a dead training run); a UTF-8 BOM made line 1 "not JSON"."""
    _wav(tmp_path / "audio/a.wav")
    good = json.dumps(_ours(), ensure_ascii=False).encode()
    latin1 = json.dumps(_ours(answer="café"), ensure_ascii=False).encode("latin-1")
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + latin1 + b"\n" + good + b"\n")
    with pytest.warns(UserWarning, match="skipped 1 line"):
        m = read_manifest(tmp_path / "m.jsonl")
    assert len(m) == 2
    assert m.problems[0][0] == 2 and "not UTF-8" in m.problems[0][1]


def test_relative_manifest_path_still_gives_absolute_audio_paths(tmp_path, monkeypatch):
    """read_manifest promises absolute audio paths; given a relative manifest path it returned
    paths relative to the current directory (and so did a relative LibriSpeech folder)."""
    _wav(tmp_path / "audio/a.wav")
    write_jsonl(tmp_path / "m.jsonl", [_ours()])
    chapter = tmp_path / "ls/19/198"
    _wav(chapter / "19-198-0000.wav")
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO\n")
    monkeypatch.chdir(tmp_path)
    (rec,) = read_manifest("m.jsonl")
    assert audio_paths(rec) == [str(tmp_path / "audio/a.wav")]
    assert list(rec["durations"]) == [str(tmp_path / "audio/a.wav")]
    (ls,) = read_librispeech("ls")
    assert audio_paths(ls) == [str(chapter / "19-198-0000.wav")]


def test_cli_stats_does_not_stop_on_free_form_fields(tmp_path, capsys):
    """`lalm data stats` raised AttributeError/TypeError on "source": null, "durations": null
    or non-numeric durations; those fields are optional and never read by training."""
    _wav(tmp_path / "audio/a.wav")
    lines = [_ours(source=None), _ours(durations=None), _ours(durations={"audio/a.wav": "0.5"}),
             _ours(task=["asr"]), _ours()]
    _write(tmp_path / "m.jsonl", lines)
    rc = cli.run(argparse.Namespace(action="stats", manifest=str(tmp_path / "m.jsonl")))
    out = capsys.readouterr().out
    assert rc == 0 and "5 records, 0 skipped" in out and "espeak-ng 4" in out


def test_build_into_a_file_is_a_named_error_with_exit_code_2(tmp_path, capsys):
    """`lalm data build --out FILE` planned, started rendering and died with a traceback
    from a worker (NotADirectoryError)."""
    target = tmp_path / "corpus.jsonl"
    target.write_text("")
    assert main(["data", "build", "--out", str(target), "--no-progress"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_interrupted_build_leaves_no_finished_looking_corpus(tmp_path, monkeypatch):
    """A build stopped while rendering over an earlier corpus left that corpus's README.md
    (what `lalm demo` takes for a finished corpus) and manifests that point at audio the new
    build had partly overwritten: a torn corpus that was reused silently."""
    out = tmp_path / "corpus"
    for f in ("README.md", "sft/train.jsonl", "pretrain/train.jsonl", "eval/asr_piper.jsonl"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("from an earlier build\n")

    class Killed(BaseException):  # stands for Ctrl-C or a kill while the clips render
        pass

    def killed(jobs, workers, progress):
        raise Killed

    monkeypatch.setattr(build_mod, "check_tools", lambda: None, raising=False)  # runs without engines too
    monkeypatch.setattr(build_mod, "_render_all", killed)
    with pytest.raises(Killed):
        build_mod.build(out, "small", seed=1, workers=1, progress=False)
    assert not (out / "README.md").exists()
    assert not list(out.rglob("*.jsonl"))


def test_write_jsonl_never_leaves_a_truncated_manifest(tmp_path):
    """write_jsonl wrote in place: stopped half-way it left the first lines only, which read
    back as a shorter valid manifest."""
    path = tmp_path / "m.jsonl"
    write_jsonl(path, [{"id": "old"}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"id": "new"}, {"id": object()}])  # fails on the second line
    assert path.read_text() == '{"id": "old"}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left either


def test_missing_engine_is_a_named_error_before_any_work(tmp_path, monkeypatch, capsys):
    """Without flite (or espeak-ng, or the [data] extra) `lalm data build` planned, started the
    render workers and died with a worker's FileNotFoundError traceback."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "flite" else real_which(name))

    def rendering(jobs, workers, progress):
        raise AssertionError("rendering started without flite")

    monkeypatch.setattr(build_mod, "_render_all", rendering)
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Debian flite" in err and "make setup" in err
    assert not (tmp_path / "c").exists()
