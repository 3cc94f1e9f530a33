"""`lalm demo` and `lalm generate` when interrupted, rerun or given awkward paths and input; the
`lalm` entry point. Fast: the demo's steps are faked (the quick demo itself is tests/test_demo.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from lalm.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny"


# -- lalm demo -------------------------------------------------------------------------------


def _pipeline(home: Path, force=()):
    from lalm.demo import Pipeline

    return Pipeline(home, RECIPE, True, list(force), False)


def test_demo_state_json_survives_a_kill_mid_write(tmp_path, monkeypatch):
    """state.json was written in place: a kill mid-write left half a JSON file, and every later
    `lalm demo` failed parsing it. Now the old file stays whole until the new one is complete."""
    p = _pipeline(tmp_path)
    p._done("corpus", "K", 1.0)
    real = Path.write_text

    def torn(self, text, *a, **k):
        if self.name.startswith("state.json"):
            real(self, text[: len(text) // 2], *a, **k)
            raise KeyboardInterrupt
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        p._done("data", "D", 1.0)
    monkeypatch.setattr(Path, "write_text", real)
    assert _pipeline(tmp_path).state == {"corpus": "K"}


def test_demo_unreadable_state_redoes_every_step_instead_of_failing(tmp_path, capsys):
    (tmp_path / "demo-quick").mkdir()
    (tmp_path / "demo-quick" / "state.json").write_text('{"corpus": "K", "da')
    assert _pipeline(tmp_path).state == {}
    assert "redoing every step" in capsys.readouterr().out


def _fake_data_step(monkeypatch, calls: list):
    """select_data's builders, faked: manifests and a tokenizer file."""
    from lalm import tokenizer
    from lalm.train import recipe

    def select(corpus, data, r):
        calls.append("data")
        (data / "sft").mkdir(parents=True, exist_ok=True)
        (data / "sft" / "train.jsonl").write_text("{}\n")
        return {"sft/train": 1}

    class Tok:
        vocab_size = 320

        def save(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(recipe, "select_manifests", select)
    monkeypatch.setattr(recipe, "manifest_texts", lambda paths: ["x"])
    monkeypatch.setattr(tokenizer, "train_bpe", lambda texts, n: Tok())


def test_demo_interrupted_forced_step_is_redone_not_reused(tmp_path, monkeypatch, capsys):
    """`lalm demo --force data`, Ctrl-C half-way, `lalm demo`: state.json still held the step's
    key over half-rewritten files, so the rerun said "up to date, reused"."""
    calls: list = []
    _fake_data_step(monkeypatch, calls)
    p = _pipeline(tmp_path)
    p.state["corpus"] = "C"
    p.select_data()
    from lalm.train import recipe

    good = recipe.select_manifests

    def killed(corpus, data, r):
        (data / "sft" / "train.jsonl").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "select_manifests", killed)
    with pytest.raises(KeyboardInterrupt):
        _pipeline(tmp_path, force=["data"]).select_data()
    monkeypatch.setattr(recipe, "select_manifests", good)
    capsys.readouterr()
    _pipeline(tmp_path).select_data()
    assert calls == ["data", "data"] and "up to date" not in capsys.readouterr().out
    assert (tmp_path / "demo-quick" / "data" / "sft" / "train.jsonl").read_text() == "{}\n"


def _fake_training(monkeypatch, calls: list):
    from lalm import demo, tokenizer
    from lalm.train import loop

    def train(cfg):
        calls.append(cfg.stage)
        (Path(cfg.out) / "final").mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(final=Path(cfg.out) / "final", last={})

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(tokenizer.Tokenizer, "load", lambda *a, **k: None)
    monkeypatch.setattr(demo, "write_generation_config",
                        lambda folder, tok, **k: (Path(folder) / demo.GENERATION_CONFIG).write_text("{}"))


def test_demo_stage_after_a_retrained_one_is_not_reused_after_an_interruption(tmp_path, monkeypatch):
    """pretrain.yaml changed: pre-training retrains, then Ctrl-C during SFT. SFT's key holds its
    init folder's path, not pre-training's key, so the rerun reused the SFT model trained on the
    old pre-training (and DPO and eval after it)."""
    calls: list = []
    _fake_training(monkeypatch, calls)

    def pipeline():
        p = _pipeline(tmp_path)
        p.state.setdefault("data", "D")
        return p

    p = pipeline()
    for stage in ("pretrain", "sft"):
        p.train(stage)
    changed = pipeline()
    changed.recipe.stages["pretrain"]["max_steps"] += 1
    changed.train("pretrain")  # ... and the run is stopped here
    rerun = pipeline()
    rerun.recipe.stages["pretrain"]["max_steps"] += 1
    rerun.train("pretrain")
    rerun.train("sft")
    assert calls == ["pretrain", "sft", "pretrain", "sft"]


def test_demo_threads_over_the_cap_are_part_of_the_stage_key(tmp_path):
    """`lalm demo --threads 0` on a big machine trains another model (README); a later plain
    `lalm demo` reused it as the README's. 1-4 threads train the same model: one key."""
    import torch

    p = _pipeline(tmp_path)
    p.state["data"] = "D"
    keys = {}
    p._up_to_date = lambda step, key, *paths: bool(keys.setdefault(torch.get_num_threads(), key))
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 4, 8):
            torch.set_num_threads(n)
            p.train("pretrain")
    finally:
        torch.set_num_threads(before)
    assert keys[1] == keys[2] == keys[4] != keys[8]


@pytest.mark.parametrize("name", ["run #2", "a: b"])
def test_demo_home_path_reaches_the_stages_as_it_is(tmp_path, name):
    """The stages' paths went through YAML-parsed overrides: a home with " #" was cut there (every
    stage's out became the parent folder) and one with ": " became a mapping."""
    home = tmp_path / name
    for stage in ("pretrain", "sft"):
        cfg = _pipeline(home).stage_config(stage)
        assert cfg.out == str(home / "demo-quick" / "runs" / stage)
        assert cfg.data == str(home / "demo-quick" / "data" / stage / "train.jsonl")
    assert cfg.init == str(home / "demo-quick" / "runs" / "pretrain" / "final")


def test_demo_torn_timings_json_does_not_fail_a_reused_run(tmp_path, monkeypatch):
    """timings.json was read back (and never used) on every run: one torn by a kill failed every
    later run at its very end. It is also written atomically now."""
    import torch

    from lalm import demo_report

    p = _pipeline(tmp_path)
    for step in ("build_corpus", "select_data", "export"):
        monkeypatch.setattr(p, step, lambda: None)
    monkeypatch.setattr(p, "train", lambda stage: None)
    monkeypatch.setattr(p, "evaluate", dict)
    monkeypatch.setattr(demo_report, "finish", lambda p, results: None)
    (tmp_path / "demo-quick").mkdir()
    (tmp_path / "demo-quick" / "timings.json").write_text('{"steps": {"cor')
    before = torch.get_num_threads()
    try:
        assert p.run() == 0
    finally:
        torch.set_num_threads(before)


class _FakePipeline:
    homes: ClassVar[list] = []

    def __init__(self, home, *a, **k):
        self.homes.append(home)

    def run(self):
        return 0


def _demo_args(*argv):
    from lalm.demo import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_relative_home_is_made_absolute(tmp_path, monkeypatch):
    """The stages' keys hold paths under HOME: `--home h` and `--home $PWD/h` (or a relative
    LALM_HOME run from elsewhere) gave the same home two keys, and retrained every stage."""
    from lalm import demo

    monkeypatch.setattr(demo, "Pipeline", _FakePipeline)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # no load sampling
    monkeypatch.chdir(tmp_path)
    _FakePipeline.homes.clear()
    assert demo.run(_demo_args("--home", "h")) == 0
    monkeypatch.setenv("LALM_HOME", "h")
    assert demo.run(_demo_args()) == 0
    assert _FakePipeline.homes == [tmp_path / "h", tmp_path / "h"]


def test_demo_unwritable_home_is_a_named_error(tmp_path, monkeypatch, capsys):
    from lalm import demo

    monkeypatch.setattr(demo, "Pipeline", _FakePipeline)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    (tmp_path / "file").write_text("")
    assert main(["demo", "--home", str(tmp_path / "file" / "home")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "--home or LALM_HOME" in err and "Traceback" not in err


# -- lalm -------------------------------------------------------------------------------------


def test_lalm_version(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("lalm ")


# -- lalm generate ----------------------------------------------------------------------------


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _text(id_, text="Say something."):
    return {"id": id_, "messages": [{"role": "user", "content": text}]}


def test_generate_rerun_after_a_kill_inside_a_utf8_character(tiny, tmp_path, capsys):
    """Answers are written with ensure_ascii=False: a kill between two flushes can cut a
    multi-byte character, and the rerun failed decoding the whole file (UnicodeDecodeError).
    Now the cut line is dropped and its id redone: every line is JSON, one per id."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _jsonl(inp, [_text("q1"), _text("q2", "Hello?")])
    args = ["generate", "--model", str(tiny.path), "--input", str(inp), "--output", str(out),
            "--temperature", "0", "--max-new-tokens", "4"]
    assert main(args) == 0
    q1, q2 = out.read_text(encoding="utf-8").splitlines()
    out.write_bytes(q1.encode() + b'\n{"id": "q2", "text": "caf\xc3')
    assert main(args) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in lines] == ["q1", "q2"]
    assert lines[1]["token_ids"] == json.loads(q2)["token_ids"]  # (alone now, not batched: logprobs may differ)
    assert "1 generated, 0 errors, 1 skipped" in capsys.readouterr().err


def test_generate_lines_holding_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028 / U+0085 raw; str.splitlines breaks there, so
    such an input line read as two bad lines, and such an answered line was not seen as done
    (redone, and the file kept the pieces)."""
    from lalm.cli.generate import done_ids, read_input

    inp = tmp_path / "in.jsonl"
    _jsonl(inp, [_text(1, "one\u2028two\x85three")])
    ((id_, messages),) = read_input(inp)
    assert id_ == 1 and messages[0]["content"] == "one\u2028two\x85three"
    out = tmp_path / "out.jsonl"
    _jsonl(out, [{"id": 1, "text": "a\u2028b"}, {"id": 2, "text": "c"}])
    before = out.read_bytes()
    assert done_ids(out) == {"1", "2"} and out.read_bytes() == before


def test_generate_input_line_not_utf8_fails_alone(tmp_path):
    from lalm.cli.generate import read_input

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(json.dumps(_text("a")).encode() + b'\n{"id": "b", "messages": "caf\xe9"}\n')
    (a, b) = read_input(inp)
    assert a[0] == "a" and b[0] == "line 2" and "not UTF-8" in b[1]


def test_generate_duplicate_ids_are_refused_before_the_model_loads(tmp_path, capsys):
    """Two lines with one id: both were answered, and a rerun skipped both as done, whichever
    had been written. The output has one line per id, so the input must too."""
    inp = tmp_path / "in.jsonl"
    _jsonl(inp, [_text("a"), _text("b"), _text("a", "Other.")])
    code = main(["generate", "--model", str(tmp_path / "no-model"), "--input", str(inp),
                 "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and ':3: id "a" is also on line 1' in err and "no-model" not in err


@pytest.mark.parametrize("where", ["under-a-file", "a-folder"])
def test_generate_unwritable_output_is_named_before_the_model_loads(tmp_path, capsys, where):
    """An output that cannot be written failed after the model had loaded (minutes for a 7B),
    with a traceback (or, for a folder, a traceback from reading it)."""
    inp = tmp_path / "in.jsonl"
    _jsonl(inp, [_text("a")])
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "file" / "o.jsonl" if where == "under-a-file" else tmp_path / "folder"
    code = main(["generate", "--model", str(tmp_path / "no-model"), "--input", str(inp), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write there" in err and "no-model" not in err and "Traceback" not in err
