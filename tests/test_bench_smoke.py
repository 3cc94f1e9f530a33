"""Smoke tests of the benchmark scripts in bench/: each one still imports, parses its documented
command line and runs end to end on tiny arguments (shapes shrunk where a script has no small
mode). Nothing here measures anything; the figures live in docs/benchmarks.md."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def bench_module(name: str, monkeypatch):
    """bench/<name>.py imported as a module (bench/ on sys.path, as when run as a script)."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def run_script(name: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], check=False, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")))
def test_help(name):
    """Every script's --help (argparse set up, module-level imports resolve)."""
    assert "usage:" in run_script(name, "--help", timeout=120)


def test_threads():
    out = run_script("threads", "--threads", "1", "--steps", "1", "--trials", "1")
    assert "| 1 |" in out and "gradients = 1 thread's" in out


def test_optimizers():
    out = run_script("optimizers", "--threads", "1", "--steps", "1", "--trials", "1")
    assert "MuonAdamW" in out and "torch.optim.Muon" in out


def test_decode_gemm_small(monkeypatch, capsys):
    """decode_gemm's main on a 2-layer, 64-wide stand-in for the mid-size decoder."""
    m = bench_module("decode_gemm", monkeypatch)
    for k, v in {"L": 2, "H": 64, "F": 128, "KV": 16, "V": 256}.items():
        monkeypatch.setattr(m, k, v)
    monkeypatch.setattr(sys, "argv", ["decode_gemm.py", "--threads", "1", "--steps", "1", "--rows", "1,3"])
    try:
        m.main()
    finally:
        m.kernels.set_threads(1)
    out = capsys.readouterr().out
    assert "1 rows  torch (MKL)" in out and "3 rows  numpy (OpenBLAS)" in out


def test_omp_wait_table(monkeypatch, capsys, tmp_path):
    """omp_wait's loop and table, with each `lalm train` run stubbed (the real one needs a demo home)."""
    m = bench_module("omp_wait", monkeypatch)
    calls = []
    monkeypatch.setattr(m, "one_run", lambda home, steps, policy, busy: calls.append((policy, busy)) or 1000.0)
    monkeypatch.setattr(sys, "argv", ["omp_wait.py", "--home", str(tmp_path), "--steps", "2", "--trials", "1"])
    m.main()
    out = capsys.readouterr().out
    assert len(calls) == 6 and "| PASSIVE + 1 busy process | 1,000 |" in out


def test_omp_wait_command_line():
    """The `lalm train` options omp_wait passes still parse."""
    import argparse

    from lalm.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--stage", "sft", "--config", "c.yaml", "--max-steps", "2", "--out", "o",
                              "--progress=false"])
    assert args.stage == "sft"


def test_tiny_sweep_wer(monkeypatch):
    m = bench_module("tiny_sweep", monkeypatch)
    assert m.wer(["the cat sat"], ["The cat, sat!"]) == 0.0
    assert m.wer(["a b c d"], ["a x c"]) == 50.0


def test_tiny_sweep_run_one(monkeypatch, tmp_path, capsys):
    """`tiny_sweep.py run --one` on a synthetic packed set in export's format (random rows)."""
    import torch
    from safetensors.torch import save_file

    from lalm.tokenizer import train_bpe

    m = bench_module("tiny_sweep", monkeypatch)
    refs = ["the cat sat on the mat", "a dog ran home", "the mat is red", "a cat and a dog"]
    tok = train_bpe(refs * 5, 300)
    tok.save(tmp_path / "tokenizer")
    g = torch.Generator().manual_seed(0)
    for name in ("train", "piper", "real"):
        meta, feats = [], []
        for i, ref in enumerate(refs):
            n, tgt = 6 + i, tok.encode(ref) + [tok.endoftext_id]
            meta.append({"n": n, "ntgt": len(tgt), "ref": ref,
                         "ids": [tok.endoftext_id] + [tok.audio_id] * n + tok.encode(" say:") + tgt})
            feats.append(torch.randn(n, 384, generator=g))
        x = torch.cat(feats)
        scale = x.abs().amax(1, keepdim=True) / 127
        save_file({"q": torch.round(x / scale).to(torch.int8), "scale": scale.half()},
                  str(tmp_path / f"{name}.safetensors"))
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    m.run_one({"tag": "t", "steps": 2, "evals": [2], "max_new": 2, "layers": 1, "hidden": 32, "ffn": 64,
               "heads": 2, "kv": 1, "bs": 2, "warmup": 1, "ema": 0.9, "muon": 1.0, "muon_fp32": 1},
              tmp_path)
    row = json.loads(capsys.readouterr().out.split(" ", 1)[1])
    assert row["step"] == 2 and {"piper", "real", "train", "piper_ema"} <= set(row)


def _shrink_generate(monkeypatch):
    """bench/generate.py with a 1-layer, 64-wide decoder and encoder (its ids and 128 mels kept)."""
    g = bench_module("generate", monkeypatch)
    monkeypatch.setattr(g, "TEXT", {**g.TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                    "num_attention_heads": 4, "num_key_value_heads": 2})
    monkeypatch.setattr(g, "AUDIO", {**g.AUDIO, "d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2,
                                     "encoder_ffn_dim": 128})
    return g


def test_generate_small(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    import torch

    g = _shrink_generate(monkeypatch)
    g.build_checkpoint(tmp_path / "mid", "mid", torch.device("cpu"))
    r = g.run_dtype(tmp_path / "mid", torch.float32, 2, 1, torch.device("cpu"))
    assert r["parity"] == [2, 2, 2]
    assert all(r[f"decode_b{b}_{n}_tok_s"] > 0 for b in (1, 8) for n in ("lalm", "transformers"))
    assert all(r[f"ttft_{s}s_{n}_s"] > 0 for s in (5, 30) for n in ("lalm", "transformers"))


def test_beam_small(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    g = _shrink_generate(monkeypatch)
    b = bench_module("beam", monkeypatch)
    assert b.build_checkpoint is g.build_checkpoint
    g.build_checkpoint(tmp_path / "mid", "mid", torch.device("cpu"))
    model = b.load_checkpoint(tmp_path / "mid", dtype=torch.float32)
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path / "mid"), dtype=torch.float32).eval()
    row = b.run(model, hf, 2, 3, 2, 1)
    assert row.startswith("| 2 |") and row.endswith("of 2 |")


def test_serve_decode_scaling_beam_checkpoint(monkeypatch, tmp_path):
    """decode_scaling on a checkpoint whose generation_config.json asks for beams (as lalm-tiny's
    does): it times one sequence per row, as `lalm serve` decodes, instead of refusing."""
    from lalm.serve.fake import tiny_random_checkpoint

    s = bench_module("serve", monkeypatch)
    folder = tiny_random_checkpoint(tmp_path / "tiny")
    cfg = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**cfg, "num_beams": 4}))
    rates = s.decode_scaling(str(folder), "float32", 1)
    assert set(rates) == {1, 8, 32} and all(v > 0 for v in rates.values())


@pytest.mark.slow
def test_serve_small():
    out = run_script("serve", "--clients", "2", "--max-tokens", "4", "--audio-seconds", "0.5", timeout=280)
    assert "identical greedy outputs: True" in out and "markdown row:" in out


@pytest.mark.slow
def test_train_small():
    out = run_script("train", "--threads", "1", "--batch", "1", "--seconds", "0.5", "--steps", "1", "--trials", "1",
                     timeout=280)
    assert out.count("first-step loss") == 2 and "speed-up" in out


DEMO_HOME = os.environ.get("LALM_BENCH_HOME")
needs_demo = pytest.mark.skipif(not DEMO_HOME, reason="set LALM_BENCH_HOME to a finished `lalm demo` home")


@pytest.mark.slow
@needs_demo
def test_train_cached_demo():
    out = run_script("train_cached", "--home", DEMO_HOME, "--steps", "2", timeout=280)
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2


@pytest.mark.slow
@needs_demo
def test_train_rows_demo():
    out = run_script("train_rows", "--home", DEMO_HOME, "--batches", "2", "--trials", "1", timeout=280)
    assert json.loads(out.strip().splitlines()[-1])["batches"] == 2
