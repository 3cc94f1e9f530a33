"""`lalm eval` as a user runs it on their own data: reruns into one --output, --limit, --task.

The model is test_eval_runner's stub (answers keyed by the audio file's stem) put in place of
`lalm.load`, so each test runs the real command line in well under a second.
Run: .venv/bin/pytest -q tests/test_eval_cli_audit.py
"""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_eval_runner import StubLM, _librispeech

import lalm
from lalm.__main__ import main
from lalm.eval import adapters
from lalm.eval.runner import RunConfig, generate_predictions


def _strict_json(path: Path):
    """json.loads accepts NaN; a report must not hold it (it is not JSON for other readers)."""
    def refuse(c):
        raise ValueError(f"{path}: {c} is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture
def stub(monkeypatch):
    """lalm.load -> a stub; returns the list of stubs made, one per `lalm eval` run."""
    made = []

    def load(model, **kw):
        made.append(StubLM({"1-2-0000": "word number 0", "a": "héllo wörld"}))
        return made[-1]

    monkeypatch.setattr(lalm, "load", load)
    return made


def _eval(*args: str) -> int:
    return main(["eval", "--no-progress", *args])


def test_a_limited_rerun_keeps_the_earlier_predictions(tmp_path, stub):
    """A quick `--limit 2` check into the folder of a finished run rewrote predictions.jsonl with
    the two items of that run only: every other prediction (hours of generation) was deleted."""
    _librispeech(tmp_path / "ls", 6)
    out = tmp_path / "out"
    common = ["--model", "m", "--data", str(tmp_path / "ls"), "--output", str(out)]
    assert _eval(*common) == 0
    assert _eval(*common, "--limit", "2") == 0
    assert len(stub[1].calls) == 0  # nothing left to generate
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"1-2-{i:04d}" for i in range(6)]
    rep = _strict_json(out / "report.json")
    assert rep["tasks"]["asr"]["by_source"]["librispeech_test_clean"]["count"] == 2  # the report: this run's items


def test_limit_below_one_is_a_named_error(tmp_path, stub, capsys):
    """--limit 0 kept no item and wrote an empty report with exit status 0."""
    _librispeech(tmp_path / "ls", 2)
    assert _eval("--model", "m", "--data", str(tmp_path / "ls"), "--output", str(tmp_path / "o"),
                 "--limit", "0") == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert not stub


def test_a_relative_model_path_names_the_checkpoint_not_the_string(tmp_path, stub, monkeypatch, capsys):
    """run.json kept --model as typed: `--model ckpt` run from two folders (two checkpoints) into
    one --output passed the check, and the second model's predictions were mixed with the first's."""
    _librispeech(tmp_path / "ls", 3)
    out = str(tmp_path / "out")
    for d in ("a", "b"):
        (tmp_path / d / "ckpt").mkdir(parents=True)
    common = ["--data", str(tmp_path / "ls"), "--output", out]
    monkeypatch.chdir(tmp_path / "a")
    assert _eval("--model", "ckpt", *common) == 0
    # The same checkpoint named by its absolute path, from elsewhere: the same run.
    monkeypatch.chdir(tmp_path)
    assert _eval("--model", str(tmp_path / "a" / "ckpt"), *common) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert _eval("--model", "ckpt", *common) == 2
    assert "another run" in capsys.readouterr().err


def test_a_run_json_of_an_older_version_still_resumes(tmp_path, stub):
    """run.json written before models were recorded by absolute path (--model as typed)."""
    _librispeech(tmp_path / "ls", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({
        "model": "Qwen/Qwen2-Audio-7B", "data": str((tmp_path / "ls").resolve()), "prompt_style": "instruct",
        "max_new_tokens": 256, "dtype": None}))
    assert _eval("--model", "Qwen/Qwen2-Audio-7B", "--data", str(tmp_path / "ls"), "--output", str(out)) == 0


def _official(folder: Path) -> Path:
    """An official-format eval file in a folder whose name names no task (a user's own data)."""
    folder.mkdir(parents=True)
    sf.write(folder / "a.wav", np.zeros(1600, np.float32), 16000)
    path = folder / "mine.jsonl"
    path.write_text(json.dumps({"audio": "a.wav", "prompt": "<|en|>", "gt": "Héllo wörld", "source": "mine_en"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def test_a_folder_of_official_files_takes_the_task_given(tmp_path, stub):
    """`--data FOLDER --task asr` over official jsonl files outside asr/, st/...: the task given
    was dropped on the way to each file, which then failed with "pass --task"."""
    _official(tmp_path / "data")
    items = adapters.load(tmp_path / "data", task="asr")
    assert [(it.task, it.reference) for it in items] == [("asr", "Héllo wörld")]
    out = tmp_path / "out"
    assert _eval("--model", "m", "--data", str(tmp_path / "data"), "--task", "asr", "--output", str(out)) == 0
    rep = _strict_json(out / "report.json")
    assert rep["tasks"]["asr"]["by_source"]["mine_en"] == {"wer": 0.0, "count": 1}  # é and ö kept


def test_a_rerun_with_another_task_does_not_reuse_the_other_tasks_answers(tmp_path):
    """An official file's task is whatever --task says, and the instruction follows it: answers made
    under `--task asr` ("Transcribe...") were taken as done for `--task ser` and scored as emotions."""
    path = _official(tmp_path / "data")
    pred = tmp_path / "out" / "predictions.jsonl"
    cfg = RunConfig(progress=False)
    generate_predictions(StubLM({"a": "hello world"}), adapters.load(path, task="asr"), pred, cfg)
    lm = StubLM({"a": "neutral"})
    records = generate_predictions(lm, adapters.load(path, task="ser"), pred, cfg)
    assert len(lm.calls) == 1
    assert [(r["task"], r["prediction"]) for r in records] == [("ser", "neutral")]
    # The same task again: nothing to generate.
    lm = StubLM({})
    generate_predictions(lm, adapters.load(path, task="ser"), pred, cfg)
    assert lm.calls == []


def test_an_output_that_is_a_file_is_a_named_error(tmp_path, stub, capsys):
    """`--output results.json` (an existing file) ended in mkdir's FileExistsError traceback."""
    _librispeech(tmp_path / "ls", 1)
    (tmp_path / "results.json").write_text("{}")
    assert _eval("--model", "m", "--data", str(tmp_path / "ls"), "--output", str(tmp_path / "results.json")) == 2
    assert "not a folder" in capsys.readouterr().err
