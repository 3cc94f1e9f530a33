"""The trainer on a CUDA GPU: fp32 there follows the CPU's loss curve, bf16 autocast learns and
saves a checkpoint that answers on the CPU, a killed GPU run resumes to the uninterrupted curve,
and the frozen encoder's cache is built on the GPU with the CPU's rows. Marked `gpu` and skipped
where torch sees no GPU (CI has none); the device tool runs them on a lent machine:

    pytest -q -m gpu tests/test_train_cuda.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_corpus import PROMPT, WORDS, asr_manifest, config, dpo_record, write_manifest

import lalm
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.train.encoder_cache import FeatureCache
from lalm.train.loop import Trainer, train
from lalm.train.metrics import read_metrics
from lalm.weights import load_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 means fp32 here: no TF32 in cuBLAS (torch's default) nor in cuDNN's convolutions (the
    encoder's two conv1d; torch's default allows TF32 there), so the GPU can match the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def losses(out: Path) -> list[float]:
    rows = read_metrics(out)
    return [r["loss"] for r in rows if "loss" in r]


def test_fp32_on_the_gpu_follows_the_cpu_curve(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    for dev in ("cpu", "cuda"):
        train(config("sft", data, tmp_path / dev, "max_steps=12", f"device={dev}", "precision=fp32"))
    cpu, gpu = losses(tmp_path / "cpu"), losses(tmp_path / "cuda")
    assert len(cpu) == len(gpu) == 12 and cpu[-1] < cpu[0]
    for a, b in zip(gpu, cpu):
        assert abs(a - b) <= 1e-4 * abs(b), (gpu, cpu)


def test_bf16_autocast_learns_and_its_checkpoint_answers_on_the_cpu(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    cfg = config("sft", data, tmp_path / "out", "max_steps=90", "lr=3e-3", "min_lr_ratio=1.0", "device=cuda")
    assert Trainer(cfg).bf16 == torch.cuda.is_bf16_supported()  # precision auto
    result = train(cfg)
    rows = losses(tmp_path / "out")
    assert rows[-1] < 0.1 < rows[0]
    model = load_checkpoint(result.final, dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp32 master weights are saved
    prompts = [[{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / f"tone-{k}-0.wav")},
                                             {"type": "text", "text": PROMPT}]}] for k in range(8)]
    for device in ("cpu", "cuda"):
        outputs = lalm.load(result.final, device=device).generate(prompts, max_new_tokens=10, temperature=0.0)
        assert [o.text for o in outputs] == WORDS[:8], device


def test_killed_gpu_run_resumes_to_the_uninterrupted_curve(tmp_path):
    """Checkpoints carry the CUDA generator too; the resumed curve is the uninterrupted one up to
    the GPU's own run-to-run noise (atomic adds in the embedding backward)."""
    data = asr_manifest(tmp_path, n=8)

    def cfg(out: Path):
        return config("sft", data, out, "max_steps=9", "save_every=3", "device=cuda", "precision=fp32",
                      "feature_dropout=0.3", f"feature_cache={tmp_path / 'cache'}", "freeze=[encoder]")

    train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000009")  # as if killed after step 6's checkpoint
    trainer = Trainer(cfg(tmp_path / "b"), resume=True)
    try:
        trainer.run()
    finally:
        trainer.close()
    assert trainer.start_step == 6  # it did resume (steps 7-9 ran on the restored state)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 9
    for x, y in zip(b, a):
        assert abs(x - y) <= 1e-5 * abs(y), (b, a)


def test_encoder_cache_is_built_on_the_gpu_with_the_cpus_rows(tmp_path, monkeypatch):
    """A GPU run encodes on the GPU (the trainer moves the frozen encoder there for it) and the rows
    are the CPU's; then DPO trains from the cache on the GPU."""
    from lalm.train import encoder_cache

    devices = []
    encode = encoder_cache.encode_windows

    def spy(tower, mels, frames):
        devices.append(next(tower.parameters()).device.type)
        return encode(tower, mels, frames)

    monkeypatch.setattr(encoder_cache, "encode_windows", spy)
    data = asr_manifest(tmp_path, n=8)
    train(config("sft", data, tmp_path / "sft", "max_steps=2", "device=cuda", "precision=fp32",
                 f"feature_cache={tmp_path / 'gpu'}", "freeze=[encoder]"))
    assert devices and set(devices) == {"cuda"}, devices
    tower = load_checkpoint(tmp_path / "sft" / "final", dtype=torch.float32).audio_tower
    clips = sorted(str(p) for p in tmp_path.glob("tone-*.wav"))
    # the trainer's encoder is the init's (preset, seed 0), which the checkpoint's tower still is (frozen)
    cpu = FeatureCache(tmp_path / "cpu", tower, 80, dtype=torch.float32)
    cpu.add(clips, progress=False)
    gpu = FeatureCache(tmp_path / "gpu", tower, 80)  # what the GPU run wrote (fp16, the default)
    assert len(gpu) == len(cpu) == 8
    for p in clips:
        ref = cpu.get(p)
        assert (gpu.get(p).float() - ref).abs().max() <= 2e-3 * ref.abs().max() + 1e-3, p
    pairs = write_manifest(tmp_path / "pairs.jsonl", [dpo_record(tmp_path, k) for k in range(8)])
    train(config("dpo", pairs, tmp_path / "dpo", "max_steps=10", "lr=3e-3", "device=cuda",
                 f"init={tmp_path / 'sft' / 'final'}", "model={}", f"feature_cache={tmp_path / 'gpu'}", "freeze=[encoder]"))
    rows = [r for r in read_metrics(tmp_path / "dpo") if "reward_margin" in r]
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]


def test_the_model_class_runs_on_the_gpu_as_on_the_cpu():
    """One forward of a random test-tiny model, CPU against GPU, fp32: equal logits."""
    from lalm.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.preset("test-tiny")
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, cfg.text.vocab_size - 8, (2, 12))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.to("cuda")(ids.to("cuda")).cpu()
    assert (gpu - cpu).abs().max() <= 1e-4 * cpu.abs().max()
