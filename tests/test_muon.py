"""train/muon.py: MuonAdamW's two halves against torch's Muon and AdamW, its training run killed
and resumed, and the config errors around it.

    .venv/bin/pytest -q tests/test_muon.py
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from train_corpus import (
    ENV,
    ROOT,
    asr_manifest,
    config,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread in this module)
)

from lalm.errors import ConfigError
from lalm.train import checkpoint
from lalm.train.config import TrainConfig
from lalm.train.loop import train
from lalm.train.metrics import read_metrics
from lalm.train.muon import MuonAdamW, orthogonalize


def params_and_grads(seed: int, shapes) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]  # 4 steps
    return params, grads


def run(opt_factory, params, grads) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_factory(ps)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def test_adamw_half_is_torch_adamw_bit_for_bit():
    params, grads = params_and_grads(0, [(6, 5), (5,), (3, 7)])
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}

    def groups(ps):
        return [{"params": ps[:1] + ps[2:], "weight_decay": 0.1}, {"params": ps[1:2], "weight_decay": 0.0}]

    ours = run(lambda ps: MuonAdamW(groups(ps), **kw), params, grads)
    ref = run(lambda ps: torch.optim.AdamW(groups(ps), foreach=False, **kw), params, grads)
    for a, b, p in zip(ours, ref, params):
        assert torch.equal(a, b)
        assert not torch.equal(a, p)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])  # wide and tall: the tall one is transposed
def test_muon_half_is_torch_muon_up_to_its_bfloat16(shape):
    params, grads = params_and_grads(1, [shape])
    lr, wd = 0.02, 0.1
    ours = run(lambda ps: MuonAdamW([{"params": ps, "muon": True}], lr=lr, weight_decay=wd, lr_ratio=1.0),
               params, grads)[0]
    ref = run(lambda ps: torch.optim.Muon(ps, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
              params, grads)[0]
    moved = (ours - params[0]).abs().max()
    # Moonlight's scaling gives each step an RMS of ~0.2 lr = 0.004: 4 steps move an entry ~0.04 at most
    assert moved > 0.02
    # torch orthogonalises in bfloat16 (8 mantissa bits): a few percent of a step apart, no more
    assert (ours - ref).abs().max() < 0.05 * moved
    # and lr_ratio scales the Muon step only
    twice = run(lambda ps: MuonAdamW([{"params": ps, "muon": True}], lr=lr, lr_ratio=2.0), params, grads[:1])[0]
    once = run(lambda ps: MuonAdamW([{"params": ps, "muon": True}], lr=lr, lr_ratio=1.0), params, grads[:1])[0]
    torch.testing.assert_close(twice - params[0], 2 * (once - params[0]))


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    g = g * torch.logspace(0, 3, 96)  # condition number ~1e3
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3, s  # NS's quintic lands in ~[0.7, 1.2], not exactly 1
    assert orthogonalize(g.T).shape == (96, 32)
    torch.testing.assert_close(orthogonalize(g.T), orthogonalize(g).T)


def test_muon_groups_take_matrices_only():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True}], lr=1e-3)


def test_killed_muon_run_resumes_to_the_uninterrupted_curve(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    cache = tmp_path / "cache"
    keys = ["max_steps=6", "save_every=3", f"feature_cache={cache}", "freeze=[encoder]", "optimizer=muon"]
    train(config("sft", data, tmp_path / "a", *keys))
    ref = read_metrics(tmp_path / "a")
    # the decoder layers' matrices are on Muon (a momentum each), everything else on AdamW
    step, folder = checkpoint.complete_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    assert step == 6
    state = checkpoint.read_tensors(folder, "optimizer.safetensors")
    assert any(k.endswith("layers.0.self_attn.q_proj.weight/momentum_buffer") for k in state), sorted(state)[:5]
    assert any(k.endswith("embed_tokens.weight/exp_avg") for k in state)
    assert not any("q_proj.weight/exp_avg" in k for k in state)
    # a fresh process, SIGKILLed half-way through writing the step-6 checkpoint, then --resume
    cli = ["--stage", "sft", "--config", str(ROOT / "configs/test/sft.yaml"), "--data", str(data),
           "--out", str(tmp_path / "b"), "--progress=false", *[f"--set={k}" for k in keys]]
    proc = subprocess.run([sys.executable, "-m", "lalm", "train", *cli], env={**ENV, checkpoint.KILL_ENV: "6"},
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    train(config("sft", data, tmp_path / "b", *keys), resume=True)
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 7))
    for x, y in zip(rows, ref):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
    # an AdamW run of the same data learns another curve (Muon is live) ...
    train(config("sft", data, tmp_path / "c", *keys[:-1]))
    assert read_metrics(tmp_path / "c")[-1]["loss"] != ref[-1]["loss"]
    # ... and cannot continue a Muon checkpoint: the optimizer slots differ
    with pytest.raises(ConfigError, match="trained with optimizer muon"):
        train(config("sft", data, tmp_path / "b", *keys[:-1], "max_steps=9"), resume=True)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer=sgd"], "^optimizer: 'sgd' is not adamw or muon"),
    (["optimizer=muon", "fsdp=true"], "^optimizer: muon .* FSDP"),
    (["optimizer=muon", "lora_r=4", "lora_target_modules=[q_proj]"], "^optimizer: muon .* LoRA"),
    (["optimizer=muon", "muon_lr_ratio=0"], "^muon_lr_ratio: must be > 0"),
])
def test_muon_config_errors_name_the_key(overrides, message):
    cfg = TrainConfig.load(ROOT / "configs/test/sft.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
