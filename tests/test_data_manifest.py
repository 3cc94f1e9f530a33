"""Manifest readers: our JSONL, ms-swift / LLaMA-Factory lines, LibriSpeech folders.

Run: .venv/bin/pytest -q tests/test_data_manifest.py
"""

import argparse
import json

import numpy as np
import pytest
import soundfile as sf

from lalm.data import cli
from lalm.data.manifest import audio_paths, read_librispeech, read_manifest, write_jsonl
from lalm.errors import LalmError


def _wav(path, seconds=0.5):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000, subtype="PCM_16")
    return path


def _ours(audio="audio/a.wav", answer="hello"):
    return {"id": "x", "source": "espeak-ng:en-us", "task": "asr",
            "messages": [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                      {"type": "text", "text": "Transcribe this audio."}]},
                         {"role": "assistant", "content": answer}],
            "durations": {audio: 0.5}}


def test_ours_resolves_audio_relative_to_the_manifest(tmp_path):
    _wav(tmp_path / "audio/a.wav")
    write_jsonl(tmp_path / "m.jsonl", [_ours()])
    m = read_manifest(tmp_path / "m.jsonl")
    assert m.problems == [] and len(m) == 1
    path = str(tmp_path / "audio/a.wav")
    assert audio_paths(m[0]) == [path]
    assert m[0]["durations"] == {path: 0.5}
    assert m[0]["messages"][1] == {"role": "assistant", "content": "hello"}


def test_malformed_lines_are_reported_with_their_line_number_and_skipped(tmp_path):
    _wav(tmp_path / "audio/a.wav")
    good = json.dumps(_ours())
    lines = [good,                                                      # 1 ok
             '{"id": "broken", "messages": [',                          # 2 not JSON
             good,                                                      # 3 ok
             "",                                                        # 4 blank: ignored
             json.dumps({"id": "y", "task": "asr"}),                    # 5 no messages
             json.dumps({**_ours(), "messages": [{"role": "robot", "content": "hi"}]}),  # 6 bad role
             json.dumps(_ours(audio="audio/missing.wav")),              # 7 audio missing
             json.dumps({**_ours(), "chosen": "a"}),                    # 8 chosen without rejected
             "[1, 2]",                                                  # 9 not an object
             good]                                                      # 10 ok
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 6 line"):
        m = read_manifest(tmp_path / "m.jsonl")
    assert len(m) == 3
    assert [n for n, _ in m.problems] == [2, 5, 6, 7, 8, 9]
    assert "m.jsonl:2: not JSON" in m.problems[0][1]
    assert "m.jsonl:6: message 0 needs a role" in m.problems[2][1]
    assert "audio file not found: audio/missing.wav" in m.problems[3][1]


def test_missing_audio_can_be_kept_when_not_checked(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [_ours(audio="nope.wav")])
    m = read_manifest(tmp_path / "m.jsonl", check_audio=False)
    assert len(m) == 1 and m.problems == []


def test_ms_swift_messages_with_audio_tags(tmp_path):
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "b.wav")
    line = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "<audio>What is this?"},
                         {"role": "assistant", "content": "a dog"},
                         {"role": "user", "content": "And this one?<audio>"},
                         {"role": "assistant", "content": "a cat"}],
            "audios": ["a.wav", "b.wav"]}
    (tmp_path / "s.jsonl").write_text(json.dumps(line) + "\n")
    (rec,) = read_manifest(tmp_path / "s.jsonl")
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "a.wav")},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "audio", "audio": str(tmp_path / "b.wav")}]},
        {"role": "assistant", "content": "a cat"}]


def test_ms_swift_rejected_response_makes_a_dpo_record(tmp_path):
    _wav(tmp_path / "a.wav")
    line = {"messages": [{"role": "user", "content": "<audio>Transcribe."},
                         {"role": "assistant", "content": "go left"}],
            "rejected_response": "go right", "audios": ["a.wav"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    (rec,) = read_manifest(tmp_path / "d.jsonl")
    assert rec["chosen"] == "go left" and rec["rejected"] == "go right"
    assert [m["role"] for m in rec["messages"]] == ["user"]


def test_llamafactory_sharegpt_with_chosen_and_rejected(tmp_path):
    _wav(tmp_path / "a.wav")
    line = {"conversations": [{"from": "human", "value": "<audio>What sound is this?"}],
            "chosen": {"from": "gpt", "value": "bell"}, "rejected": {"from": "gpt", "value": "drum"},
            "audios": ["a.wav"], "system": "You are a helpful assistant."}
    old = {"query": "<audio>Say it again", "response": "two", "history": [["hi", "hello"]],
           "audios": [str(tmp_path / "a.wav")]}
    (tmp_path / "l.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(old) + "\n")
    a, b = read_manifest(tmp_path / "l.jsonl")
    assert a["chosen"] == "bell" and a["rejected"] == "drum"
    assert a["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert a["messages"][1]["content"][0]["type"] == "audio"
    assert [m["role"] for m in b["messages"]] == ["user", "assistant", "user", "assistant"]
    assert b["messages"][2]["content"][1] == {"type": "text", "text": "Say it again"}


def test_audio_tag_count_mismatch_is_a_reported_line(tmp_path):
    _wav(tmp_path / "a.wav")
    lines = [{"messages": [{"role": "user", "content": "<audio><audio>x"}], "audios": ["a.wav"]},
             {"messages": [{"role": "user", "content": "x"}], "audios": ["a.wav"]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.warns(UserWarning):
        m = read_manifest(tmp_path / "bad.jsonl")
    assert len(m) == 0
    assert "more <audio> tags" in m.problems[0][1] and "no <audio> tag" in m.problems[1][1]


def test_librispeech_folder(tmp_path):
    chapter = tmp_path / "ls" / "19" / "198"
    _wav(chapter / "19-198-0000.wav")
    sf.write(chapter / "19-198-0001.flac", np.zeros(8000, np.float32), 16000)
    (chapter / "19-198.trans.txt").write_text(
        "19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n19-198-0002 MISSING FILE\n")
    with pytest.warns(UserWarning, match="skipped 1"):
        m = read_manifest(tmp_path / "ls")
    assert [r["id"] for r in m] == ["19-198-0000", "19-198-0001"]
    assert m[1]["messages"][1] == {"role": "assistant", "content": "this little work"}
    assert m[1]["messages"][0]["content"][0]["audio"] == str(chapter / "19-198-0001.flac")
    assert m.problems[0][0] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(LalmError, match="trans.txt"):
        read_librispeech(tmp_path / "empty")


def test_cli_check_reports_line_numbers(tmp_path, capsys):
    _wav(tmp_path / "audio/a.wav")
    (tmp_path / "m.jsonl").write_text(json.dumps(_ours()) + "\n{oops\n")
    rc = cli.run(argparse.Namespace(action="check", manifest=str(tmp_path / "m.jsonl")))
    out = capsys.readouterr().out
    assert rc == 1 and "line 2:" in out and "1 records loaded, 1 skipped" in out
