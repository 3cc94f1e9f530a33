"""lalm demo: the recipe keeps held-out material out of training, and `lalm demo --quick` trains
through the one loop on cached encoder features, produces a loadable checkpoint that answers
(then a second run reuses everything). The cached-feature path itself: tests/test_train_cached.py."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lalm.data.manifest import load_records
from lalm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_text_questions_skip_eval_questions():
    from lalm.train.recipe import text_questions

    first = text_questions(50, 7, set())
    held = {first[0]["messages"][0]["content"], first[3]["messages"][0]["content"]}
    again = text_questions(50, 7, held)
    assert len(again) == 50
    assert not held & {r["messages"][0]["content"] for r in again}


def test_recipe_rejects_unknown_keys(tmp_path):
    from lalm.errors import ConfigError
    from lalm.train.recipe import Recipe

    (tmp_path / "demo.yaml").write_text("vocab_size: 512\nlerning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown recipe key 'lerning_rate'"):
        Recipe.load(tmp_path)


def test_spoken_qa_repeat_oversamples_voice_chat_lines_only(tmp_path):
    """select_manifests with spoken_qa_repeat: an SFT line whose user turns are audio alone
    appears that many times (a line with text in a user turn, once); the BPE text counts it once.
    asr_repeat does the same for transcription lines, and only for them."""
    from lalm.train.recipe import Recipe, manifest_texts, select_manifests, spoken_only

    def rec(i, user):
        return {"id": f"sft-{i}", "source": "flite:slt", "task": "voice_chat",
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "4"}]}

    import numpy as np
    import soundfile as sf

    wav = tmp_path / "audio" / "voice_chat" / "000000.wav"
    wav.parent.mkdir(parents=True)
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    wav = str(wav)
    spoken = rec(0, [{"type": "audio", "audio": wav}])
    typed = rec(1, [{"type": "audio", "audio": wav}, {"type": "text", "text": "What did I ask?"}])
    assert spoken_only(spoken) and not spoken_only(typed)
    for stage in ("pretrain", "sft", "dpo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "dev.jsonl").write_text("")
        asr = {**typed, "id": "sft-2", "task": "asr"}
        lines = [spoken, typed, asr] if stage == "sft" else []
        (tmp_path / stage / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    counts = select_manifests(tmp_path, out, Recipe(spoken_qa_repeat=3))
    assert counts["sft/train"] == 5
    ids = [r["id"] for r in load_records(out / "sft" / "train.jsonl")]
    assert ids == ["sft-0", "sft-0", "sft-0", "sft-1", "sft-2"]
    assert manifest_texts([out / "sft" / "train.jsonl"]).count("4") == 3
    select_manifests(tmp_path, out, Recipe(spoken_qa_repeat=3, asr_repeat=2))
    ids = [r["id"] for r in load_records(out / "sft" / "train.jsonl")]
    assert ids == ["sft-0", "sft-0", "sft-0", "sft-1", "sft-2", "sft-2"]


def test_pretrain_chat_flags_a_share_of_pretraining_lines(tmp_path):
    """pretrain_chat: that share of pre-training lines (seeded) gets "format": "chat"; other
    stages and a share of 0 are untouched; a share outside [0, 1] is a recipe error."""
    from lalm.errors import ConfigError
    from lalm.train.recipe import Recipe, select_manifests

    lines = [{"id": f"pt-{i}", "source": "flite:slt", "task": "asr",
              "messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "ok"}]}
             for i in range(400)]
    for stage in ("pretrain", "sft", "dpo"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "dev.jsonl").write_text("")
        (tmp_path / stage / "train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in (lines if stage != "dpo" else [])))
    formats = {}
    for share in (0.0, 0.3):
        select_manifests(tmp_path, tmp_path / f"out{share}", Recipe(pretrain_chat=share))
        formats[share] = [r.get("format") for r in load_records(tmp_path / f"out{share}" / "pretrain" / "train.jsonl")]
        assert all("format" not in r for r in load_records(tmp_path / f"out{share}" / "sft" / "train.jsonl"))
    assert set(formats[0.0]) == {None}
    assert 90 <= formats[0.3].count("chat") <= 150 and set(formats[0.3]) == {None, "chat"}
    (tmp_path / "demo.yaml").write_text("pretrain_chat: 1.5\n")
    with pytest.raises(ConfigError, match="pretrain_chat must be a share"):
        Recipe.load(tmp_path)


def test_corpus_key_follows_the_build_plan(monkeypatch):
    """A generator change (here: more spoken questions) makes an existing demo home rebuild its corpus."""
    from lalm.data import tasks
    from lalm.demo import corpus_key

    before = corpus_key("small", 0)
    assert corpus_key("small", 0) == before and corpus_key("small", 1) != before
    monkeypatch.setitem(tasks.SIZES, "small", {**tasks.SIZES["small"], "voice_chat": 51})
    assert corpus_key("small", 0) != before


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 code paths only")
def test_demo_pins_the_avx2_code_paths():
    """The demo trains the same model on AVX2 and AVX-512 hosts only with torch, MKL and oneDNN held
    to their AVX2 paths (docs/lalm-tiny.md, stop 22): importing lalm.demo sets them, even after
    torch, and a variable the user set wins."""
    pinned = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
    code = ("import os, torch, lalm.demo; print(torch.backends.cpu.get_cpu_capability(), "
            + ", ".join(f"os.environ['{v}']" for v in pinned[1:]) + ")")

    def run(**extra):
        env = {k: v for k, v in os.environ.items() if k not in pinned} | extra
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.split()

    cap, mkl, onednn = run()
    assert cap in ("AVX2", "DEFAULT") and (mkl, onednn) == ("AVX2", "AVX2")  # DEFAULT: a CPU without AVX2
    assert run(ATEN_CPU_CAPABILITY="default", MKL_CBWR="AUTO")[:2] == ["DEFAULT", "AUTO"]


def test_demo_spins_openmp_waits_only_on_an_idle_machine(monkeypatch):
    """Spinning waits are ~1.35x faster alone and ~2x slower beside a busy process (docs/benchmarks.md):
    the demo keeps OpenMP's default only when nothing else used a quarter core; a user's value wins."""
    from lalm.demo import choose_openmp_waits

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "spinning" in choose_openmp_waits(0.05) and "OMP_WAIT_POLICY" not in os.environ
    for busy in (0.3, 1.0, None):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        assert choose_openmp_waits(busy).startswith("PASSIVE") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert choose_openmp_waits(2.0) == "ACTIVE (set by you)" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux /proc/stat")
def test_cores_busy_elsewhere_sees_a_busy_process():
    from lalm.demo import cores_busy_elsewhere, usable_cores

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = cores_busy_elsewhere(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and 0.5 < busy <= usable_cores() + 0.1


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the x86 code paths the demo pins")
def test_demo_caps_its_threads_where_the_arithmetic_stays_the_same():
    """The demo's model is the same on any machine only while torch runs 1-4 threads (docs/lalm-tiny.md,
    stop 23): demo.yaml caps them at 4. A training step as the demo runs it (lalm-tiny's sizes,
    cached encoder rows, padded rows of different lengths, the last layer from the first target
    row, loss on target rows) gives the same gradients bit for bit with 1, 2 and 4 threads (with 5
    this very step differed on stop 23's AVX-512 EPYC)."""
    import torch

    from lalm.config import ModelConfig
    from lalm.demo import demo_threads
    from lalm.model import Qwen2AudioForConditionalGeneration
    from lalm.train.recipe import Recipe

    assert Recipe.load(ROOT / "configs/tiny").threads == 4
    assert (demo_threads(4, 2), demo_threads(4, 16), demo_threads(0, 16), demo_threads(1, 8)) == (2, 4, 16, 1)

    torch.manual_seed(0)  # this draw's step differed with 5 threads on stop 23's host
    cfg = ModelConfig.preset("tiny", text={"vocab_size": 2048}, audio_token_index=2045)
    model = Qwen2AudioForConditionalGeneration(cfg)
    model.audio_tower.requires_grad_(False)  # frozen in every stage of the recipe
    B, T = 16, 75
    lens = torch.randint(50, T + 1, (B,))
    lens[0] = T
    n_audio = [int(n) - 15 for n in lens]  # audio rows, then 15 prompt + answer tokens
    ids = torch.randint(0, 2040, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100)
    for b in range(B):
        ids[b, 1: 1 + n_audio[b]] = 2045
        mask[b, : lens[b]] = True
        labels[b, n_audio[b] + 3: lens[b]] = ids[b, n_audio[b] + 3: lens[b]]
    rows = torch.randn(sum(n_audio), cfg.audio.d_model)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    sel = labels != -100
    first = int(sel.any(0).nonzero()[0])

    def grads(threads: int) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model.zero_grad(set_to_none=True)
            h = model.hidden_states(ids, pos, mask, audio_rows=rows, rows_from=first)  # (B, T - first, 256)
            logits = model.language_model.lm_head(h[sel[:, first:]])
            torch.nn.functional.cross_entropy(logits, labels[:, first:][sel[:, first:]], reduction="sum").backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            torch.set_num_threads(before)

    one = grads(1)
    assert len(one) > 20
    for threads in (2, 4):
        other = grads(threads)
        assert [n for n in one if not torch.equal(one[n], other[n])] == [], threads


def test_demo_trains_on_the_cpu_unless_asked_and_takes_a_thread_count(tmp_path):
    """The README's model is the CPU's: every stage gets device=cpu (part of its key, so a GPU run
    retrains rather than reuses); --device cuda and --threads are the user's way out, checked first."""
    import argparse

    import torch

    from lalm.demo import Pipeline, add_arguments, run
    from lalm.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--home", str(tmp_path)])
    assert (args.device, args.threads) == ("cpu", None)
    recipe = ROOT / "configs" / "tiny"
    assert Pipeline(tmp_path, recipe, False, [], False).stage_config("sft").device == "cpu"
    cfg = Pipeline(tmp_path, recipe, False, [], False, threads=16, device="cuda").stage_config("dpo")
    assert cfg.device == "cuda"
    with pytest.raises(ConfigError, match="--threads -1"):
        run(parser.parse_args(["--home", str(tmp_path), "--threads", "-1"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            run(parser.parse_args(["--home", str(tmp_path), "--device", "cuda"]))
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_quick_demo_end_to_end(tmp_path, capsys):
    """`lalm demo --quick`: corpus, three stages, eval, a model that loads and answers; rerun reuses."""
    import lalm
    from lalm.__main__ import main

    home = tmp_path / "home"
    assert main(["demo", "--quick", "--home", str(home), "--no-progress"]) == 0
    out = capsys.readouterr().out
    model_dir = home / "demo-quick" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name
    assert "lalm chat --model" in out and "lalm serve --model" in out and "| held-out eval set |" in out
    # no held-out source in any training manifest the stages read
    for stage in ("pretrain", "sft", "dpo"):
        for rec in load_records(home / "demo-quick" / "data" / stage / "train.jsonl"):
            assert not rec["source"].startswith(("piper", "pocketsphinx", "alsa")), rec["source"]
            assert "/eval/" not in json.dumps(rec["messages"])
    saved = json.loads((home / "demo-quick" / "eval" / "results.json").read_text())
    sets = {s for r in saved["results"].values() for s in r["by_source"]}
    assert {"asr_piper", "asr_real", "voice_chat_piper", "coarse"} <= sets
    # ... and by kind of sentence / question, printed and kept in results.md
    assert {"asr_piper", "voice_chat_piper"} <= set(saved["results"]["asr"]["by_subset"]) | set(
        saved["results"]["voice_chat"]["by_subset"])
    assert "| held-out eval set | kind | n | lalm-tiny |" in out
    assert "| kind | n |" in (home / "demo-quick" / "results.md").read_text()
    assert {"before", "after"} <= set(saved["dpo"])
    assert (home / "demo-quick" / "loss_curves.png").is_file() and (home / "demo-quick" / "metrics.png").is_file()
    # the stages ran through lalm.train.loop (its config.yaml and summary) on the demo's feature cache
    for stage in ("pretrain", "sft", "dpo"):
        run = home / "demo-quick" / "runs" / stage
        assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
        assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] > 0
    assert (home / "demo-quick" / "cache" / "index.json").is_file()
    assert json.loads((home / "demo-quick" / "runs" / "pretrain" / "summary.json").read_text())["skipped_records"] == 0

    lm = lalm.load(model_dir)
    assert lm.config.audio.d_model == 384 and lm.config.audio.num_mel_bins == 80  # Whisper tiny.en
    clip = load_records(home / "corpus-quick" / "eval" / "asr_piper.jsonl")[0]["messages"]
    res = lm.generate([clip], max_new_tokens=4)[0]
    assert res.audio_tokens > 0 and len(res.token_ids) >= 1

    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--quick", "--home", str(home), "--no-progress"]) == 0
    again = capsys.readouterr().out
    for step in ("corpus", "data", "pretrain", "sft", "dpo", "eval"):
        assert f"[{step}] up to date, reused" in again
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
