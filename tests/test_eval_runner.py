"""`lalm eval`: generation (restart, errors, data-parallel shards), scoring CLI, and the report.

The model here is a stub with `LALM.generate`'s contract; test_eval_real.py runs a real tiny one.
Run: .venv/bin/pytest -q tests/test_eval_runner.py
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import lalm
from lalm.__main__ import main
from lalm.errors import AudioError
from lalm.eval import adapters, runner
from lalm.eval.runner import RunConfig, generate_predictions, score_records, shard


@dataclass
class Result:
    text: str


class StubLM:
    """Answers from a table keyed by the audio file's stem; records every call."""

    def __init__(self, answers: dict[str, str], fail_after: int | None = None, bad: str | None = None):
        self.answers, self.calls, self.fail_after, self.bad = answers, [], fail_after, bad

    def generate(self, conversations, **kw):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # the run is killed here
        self.calls.append((len(conversations), kw))
        out = []
        for conv in conversations:
            audio = conv["audios"][0] if isinstance(conv, dict) else next(
                p["audio"] for m in conv for p in m["content"] if isinstance(p, dict) and p.get("type") == "audio")
            if Path(audio).stem == self.bad:
                raise AudioError(f"{audio}: cannot decode")
            out.append(Result(self.answers.get(Path(audio).stem, "")))
        return out


def _tone(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, np.float32), 16000)
    return path


def _librispeech(root: Path, n: int) -> dict[str, str]:
    chap = root / "LibriSpeech" / "test-clean" / "1" / "2"
    texts = {f"1-2-{i:04d}": f"WORD NUMBER {i}" for i in range(n)}
    chap.mkdir(parents=True, exist_ok=True)
    (chap / "1-2.trans.txt").write_text("".join(f"{k} {v}\n" for k, v in texts.items()))
    for k in texts:
        _tone(chap / f"{k}.flac")
    return texts


def test_shards_are_the_official_contiguous_split():
    items = list(range(10))
    assert [shard(items, r, 3) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard([1], 1, 2) == []


def test_generation_is_restartable_and_greedy(tmp_path):
    texts = _librispeech(tmp_path, 7)
    items = adapters.load(tmp_path)
    answers = {k: v.lower() for k, v in texts.items()}
    answers["1-2-0003"] = "word numbers 3"  # one substitution
    pred = tmp_path / "out" / "predictions.jsonl"
    cfg = RunConfig(batch_size=3, prompt_style="base", progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_predictions(StubLM(answers, fail_after=1), items, pred, cfg)
    assert len(pred.read_text().splitlines()) == 3  # the first batch survived the kill
    lm = StubLM(answers)
    records = generate_predictions(lm, items, pred, cfg)
    assert [n for n, _ in lm.calls] == [3, 1]  # only the 4 missing items were generated
    kw = lm.calls[0][1]
    assert (kw["temperature"], kw["max_new_tokens"], kw["min_new_tokens"], kw["num_beams"]) == (0, 256, 1, None)
    assert [r["id"] for r in records] == [it.id for it in items]
    assert [json.loads(line)["id"] for line in pred.read_text().splitlines()] == [it.id for it in items]
    res = score_records(records, "asr")["asr"]
    assert res["by_source"]["librispeech_test_clean"]["wer"] == pytest.approx(1 / 21)


def test_a_bad_item_does_not_sink_its_batch(tmp_path):
    _librispeech(tmp_path, 4)
    items = adapters.load(tmp_path)
    records = generate_predictions(StubLM({"1-2-0000": "word number 0"}, bad="1-2-0001"), items,
                                   tmp_path / "p.jsonl", RunConfig(batch_size=4, progress=False))
    assert records[1]["prediction"] == "" and "cannot decode" in records[1]["error"]
    assert records[0]["prediction"] == "word number 0" and "error" not in records[0]
    # A rerun (the audio fixed) retries the failed item only, and its new answer replaces the error.
    lm = StubLM({"1-2-0001": "word number 1"})
    records = generate_predictions(lm, items, tmp_path / "p.jsonl", RunConfig(batch_size=4, progress=False))
    assert [n for n, _ in lm.calls] == [1]
    assert records[1]["prediction"] == "word number 1" and "error" not in records[1]
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4


def test_failed_items_are_skipped_and_counted_not_scored():
    """An item whose generation failed has no prediction: scoring its empty text would count every
    reference word as deleted (or ask the judge about an empty answer). It is left out and counted."""
    from lalm.eval import report
    from lalm.eval.judge import ChatScore, JudgeConfig

    recs = [{"id": "1", "task": "asr", "source": "a", "lang": "en", "prediction": "hello world",
             "reference": "hello world"},
            {"id": "2", "task": "asr", "source": "a", "lang": "en", "prediction": "", "reference": "good morning",
             "error": "x.flac: cannot decode"},
            {"id": "3", "task": "asr", "source": "b", "lang": "en", "prediction": "", "reference": "one two",
             "error": "y.flac: cannot decode"},
            {"id": "4", "task": "ser", "source": "meld_test", "prediction": "", "reference": "joy", "error": "bad"}]
    res = score_records(recs)
    assert res["asr"]["metrics"] == {"wer": 0.0, "count": 1, "skipped": 2}
    assert res["asr"]["by_source"] == {"a": {"wer": 0.0, "count": 1, "skipped": 1}, "b": {"count": 0, "skipped": 1}}
    assert res["ser"]["metrics"] == {"count": 0, "skipped": 1}  # nothing left to score: no accuracy of 0
    assert "| a | 1 (1 skipped) | WER % | 0.00 |" in report.markdown(res)

    class CountingJudge:  # what score_chat needs of a Judge; records what it is asked
        config, asked = JudgeConfig(url="http://unused", workers=1), []

        def score(self, meta_info, question, reference, prediction):
            self.asked.append(prediction)
            return ChatScore([7, 7], [8, 8], 0)

    chat = [{"id": "1", "task": "chat", "source": "sound_QA", "question": "q", "reference": "r", "prediction": "ok"},
            {"id": "2", "task": "chat", "source": "sound_QA", "question": "q", "reference": "r", "prediction": "",
             "error": "bad"}]
    judge = CountingJudge()
    res = score_records(chat, judge=judge)["chat"]
    assert judge.asked == ["ok"]  # the failed item was never sent to the judge
    assert res["by_source"]["sound_QA"]["skipped"] == 1 and res["metrics"]["skipped"] == 1


def test_score_command_prints_json(tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    rows = [{"id": "1", "source": "librispeech_test_clean", "lang": "en", "prediction": "hello world",
             "reference": "HELLO WORLD"},
            {"id": "2", "source": "cv15_fr", "lang": "fr", "prediction": "bonjour", "reference": "Bonjour à tous"}]
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "score", "--task", "asr", "--predictions", str(pred), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "asr"
    assert out["by_source"]["librispeech_test_clean"] == {"wer": 0.0, "count": 1}
    assert out["by_source"]["cv15_fr"]["wer"] == pytest.approx(2 / 3)
    assert out["metrics"]["wer"] == pytest.approx(2 / 5)

    ser = tmp_path / "ser.jsonl"
    ser.write_text(json.dumps({"id": "1", "source": "meld_test", "lang": "en", "prediction": " joy",
                               "reference": "joy"}) + "\n" + json.dumps(
        {"id": "2", "source": "meld_test", "lang": "en", "prediction": "It sounds like anger.",
         "reference": "anger"}) + "\n")
    assert main(["eval", "score", "--task", "ser", "--predictions", str(ser), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["accuracy"] == 0.5 and out["metrics"]["accuracy_lenient"] == 1.0


def test_score_command_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "score", "--task", "asr", "--predictions", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such predictions file" in capsys.readouterr().err


def _manifests(root: Path) -> dict[str, str]:
    """A miniature DIR/eval as the corpus builder writes it: four tasks."""
    answers = {}
    sets = {
        "asr_piper": ("asr", "Transcribe this audio.", "go forward ten meters", "go forward ten meters"),
        "voice_chat": ("voice_chat", None, "12", "Twelve."),
        "coarse": ("coarse", "Is this speech, music, or another sound? Answer with one word.", "music", "speech"),
        "sound": ("sound", "What sound is this? Answer with one word.", "bell", "A bell."),
    }
    for name, (task, prompt, ref, answer) in sets.items():
        wav = _tone(root / "audio" / "eval" / f"{name}.wav")
        answers[wav.stem] = answer
        content = [{"type": "audio", "audio": f"../audio/eval/{name}.wav"}]
        if prompt:
            content.append({"type": "text", "text": prompt})
        row = {"id": f"eval/{name}/00000", "source": f"held-out:{name}", "task": task, "lang": "en",
               "messages": [{"role": "user", "content": content}], "reference": ref}
        (root / "eval").mkdir(parents=True, exist_ok=True)
        (root / "eval" / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    return answers


def test_eval_on_the_corpus_dev_sets_reports_every_task(tmp_path, monkeypatch, capsys):
    answers = _manifests(tmp_path / "corpus")
    monkeypatch.setattr(lalm, "load", lambda path, dtype=None, device=None: StubLM(answers))
    out = tmp_path / "report"
    rc = main(["eval", "--model", "stub", "--task", "auto", "--data", str(tmp_path / "corpus" / "eval"),
               "--output", str(out), "--batch-size", "2", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["tasks"]) == {"asr", "voice_chat", "coarse", "sound"}
    assert rep["tasks"]["asr"]["metrics"]["wer"] == 0.0
    assert rep["tasks"]["voice_chat"]["metrics"]["accuracy"] == 1.0  # "Twelve." == "12" after normalising
    assert rep["tasks"]["coarse"]["metrics"]["accuracy"] == 0.0
    assert rep["tasks"]["sound"]["metrics"]["accuracy"] == 1.0
    md = (out / "report.md").read_text()
    for task in ("asr", "voice_chat", "coarse", "sound"):
        assert f"## {task}" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Scoring the same predictions file again gives the same numbers.
    assert main(["eval", "score", "--task", "auto", "--predictions", str(out / "predictions.jsonl"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["metrics"]["voice_chat/accuracy"] == 1.0 and again["metrics"]["asr/wer"] == 0.0
    # Restarting into the same folder with other settings would mix predictions: refused.
    assert main(["eval", "--model", "stub", "--data", str(tmp_path / "corpus" / "eval"), "--output", str(out),
                 "--prompt-style", "base", "--no-progress"]) == 2
    assert "holds predictions of another run" in capsys.readouterr().err


def test_num_beams_reaches_the_model_and_is_part_of_the_run(tmp_path, monkeypatch, capsys):
    answers = _manifests(tmp_path / "corpus")
    stub = StubLM(answers)
    monkeypatch.setattr(lalm, "load", lambda path, dtype=None, device=None: stub)
    data, out = str(tmp_path / "corpus" / "eval"), tmp_path / "beams"
    assert main(["eval", "--model", "stub", "--data", data, "--output", str(out), "--num-beams", "4",
                 "--no-progress"]) == 0
    assert {kw["num_beams"] for _, kw in stub.calls} == {4}
    assert json.loads((out / "run.json").read_text())["num_beams"] == 4
    assert json.loads((out / "report.json").read_text())["info"]["num_beams"] == 4
    # Greedy predictions must not be appended to a beam-search run's file.
    assert main(["eval", "--model", "stub", "--data", data, "--output", str(out), "--no-progress"]) == 2
    assert "holds predictions of another run" in capsys.readouterr().err


def test_report_puts_the_paper_beside_ours(tmp_path):
    from lalm.eval import report

    results = {"asr": {"metrics": {"wer": 0.02}, "by_source": {"librispeech_test_clean": {"wer": 0.02, "count": 3},
                                                              "mine": {"wer": 0.5, "count": 1}}},
               "vsc": {"metrics": {"accuracy": 0.5}, "by_source": {"vocalsound_test": {
                   "accuracy": 0.5, "accuracy_lenient": 0.75, "count": 4}}}}
    rows = {r["source"]: r for r in report.table_rows(results)}
    assert rows["librispeech_test_clean"]["ours"] == pytest.approx(2.0)  # percent, as the paper prints
    assert (rows["librispeech_test_clean"]["paper"], rows["librispeech_test_clean"]["hf_converted"]) == (1.6, 1.7)
    assert rows["mine"]["paper"] is None
    assert rows["vocalsound_test"]["paper"] == 0.9392 and rows["vocalsound_test"]["ours_lenient"] == 0.75
    paths = report.write(results, tmp_path)
    assert "| LibriSpeech test-clean | 3 | WER % | 2.00 | - | 1.60 | 1.70 |" in paths["markdown"].read_text()


def test_subsets_are_scored_apart_within_their_set(tmp_path, monkeypatch, capsys):
    """lalm's eval lines may name a subset (the kind of sentence or question): each one gets its
    own score beside the set's, from the predictions file alone."""
    root = tmp_path / "corpus"
    lines, answers = [], {}
    for i, (ref, hyp, subset) in enumerate([("turn left", "ten", "command"),            # 1 sub + 1 del of 2
                                            ("open the door", "open the door", "command"),  # 0 of 3
                                            ("paul sang loudly", "paul sang", "everyday"),  # 1 del of 3
                                            ("red blue", "red blue", None)]):               # no subset
        wav = _tone(root / "audio" / f"{i}.wav")
        answers[wav.stem] = hyp
        row = {"id": f"a{i}", "source": "piper", "task": "asr", "reference": ref,
               "messages": [{"role": "user", "content": [{"type": "audio", "audio": f"../audio/{i}.wav"},
                                                         {"type": "text", "text": "Transcribe this audio."}]}]}
        lines.append(json.dumps(row | ({"subset": subset} if subset else {})))
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "asr_piper.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(lalm, "load", lambda path, dtype=None, device=None: StubLM(answers))
    out = tmp_path / "report"
    assert main(["eval", "--model", "stub", "--data", str(root / "eval"), "--output", str(out), "--no-progress"]) == 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p.get("subset") for p in preds] == ["command", "command", "everyday", None]
    rep = json.loads((out / "report.json").read_text())["tasks"]["asr"]
    assert rep["metrics"]["wer"] == pytest.approx(3 / 10)
    assert rep["by_subset"] == {"asr_piper": {"command": {"wer": pytest.approx(2 / 5), "count": 2},
                                              "everyday": {"wer": pytest.approx(1 / 3), "count": 1}}}
    md = (out / "report.md").read_text()
    assert "| asr_piper | command | 2 | WER % | 40.00 |" in md and "| asr_piper | everyday | 1 | WER % | 33.33 |" in md
    assert main(["eval", "score", "--task", "asr", "--predictions", str(out / "predictions.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["by_subset"]["asr_piper"]["command"]["count"] == 2
    # Records without subsets report none.
    assert "by_subset" not in score_records([{"task": "asr", "source": "s", "reference": "a", "prediction": "a"}])["asr"]


# ---------------------------------------------------------------------------------------------- torchrun
def _rank_main(rank: int, world: int, data: str, pred: str, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    items = adapters.load(data)
    answers = {Path(it.audio[0]).stem: f"answer {rank}" for it in items}
    generate_predictions(StubLM(answers), items, pred, RunConfig(batch_size=2, progress=False))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow  # spawns two ranks (two fresh interpreters importing torch): ~20 s here
def test_data_parallel_ranks_take_shards_and_rank0_merges(tmp_path):
    import socket

    import torch.multiprocessing as mp

    _librispeech(tmp_path, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pred = tmp_path / "predictions.jsonl"
    mp.spawn(_rank_main, args=(2, str(tmp_path), str(pred), port), nprocs=2, join=True)
    records = runner.read_predictions(pred)
    assert [r["id"] for r in records] == [f"1-2-{i:04d}" for i in range(5)]
    assert [r["prediction"] for r in records] == ["answer 0"] * 3 + ["answer 1"] * 2
    assert not list(tmp_path.glob("predictions.jsonl.rank*"))
