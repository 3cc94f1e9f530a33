"""Training on cached frozen-encoder outputs (`feature_cache`): the same loss as the mel path, the
same resume guarantee as every run, and config errors naming the key.

    .venv/bin/pytest -q tests/test_train_cached.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_corpus import (
    ENV,
    ROOT,
    asr_manifest,
    asr_record,
    config,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread in this module)
    write_audio,
    write_manifest,
)

from lalm.errors import ChatFormatError, ConfigError
from lalm.processor import collate
from lalm.train import build, checkpoint, losses
from lalm.train.config import TrainConfig
from lalm.train.data import TrainData, augment_rows
from lalm.train.encoder_cache import FeatureCache
from lalm.train.loop import _forward_rows, train
from lalm.train.metrics import read_metrics


def two_audio_record(folder: Path) -> dict:
    """Two clips in one turn, one of them long enough for several hundred frames."""
    long = folder / "long.wav"
    if not long.exists():
        import numpy as np
        import soundfile as sf
        from train_corpus import tone

        sf.write(long, np.concatenate([tone(k, seconds=0.5) for k in range(6)]), 16000)
    return {"id": "two", "messages": [
        {"role": "user", "content": [{"type": "audio", "audio": write_audio(folder, 3)},
                                     {"type": "audio", "audio": long.name},
                                     {"type": "text", "text": "Transcribe both."}]},
        {"role": "assistant", "content": "four and more"}]}


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_cached_rows_give_the_mel_paths_logits_and_loss(tmp_path, stage):
    data = write_manifest(tmp_path / "m.jsonl", [asr_record(tmp_path, k) for k in range(3)]
                          + [two_audio_record(tmp_path)])
    cfg = config(stage, data, tmp_path / "out")
    tok = build.build_tokenizer(cfg)
    torch.manual_seed(0)
    model = build.build_model(cfg, tok).eval()
    with torch.no_grad():  # O(1) weights, so every audio row visibly moves the logits
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    n_mels = model.config.audio.num_mel_bins
    exact = FeatureCache(tmp_path / "fp32", model.audio_tower, n_mels, dtype=torch.float32)
    half = FeatureCache(tmp_path / "fp16", model.audio_tower, n_mels)
    mel_data = TrainData(str(data), stage, tok, n_mels)
    paths = sorted({p["audio"] for r in mel_data.records for m in r["messages"] if isinstance(m["content"], list)
                    for p in m["content"] if p["type"] == "audio"})
    assert exact.add(paths, progress=False) == len(paths) == 5 and half.add(paths, progress=False) == 5
    again = FeatureCache(tmp_path / "fp32", model.audio_tower, n_mels, dtype=torch.float32)  # from disk
    assert len(again) == 5 and again.add(paths, progress=False) == 0 and again.get(paths[0]).dtype == torch.float32

    def logits_and_loss(dataset):
        batch = collate([dataset.examples(i)[0] for i in range(len(dataset))], tok.pad_id)
        with torch.no_grad():
            full = model(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mel, batch.mel_frames,
                         audio_rows=batch.audio_rows)  # (B, T, V)
            rows, targets, _ = _forward_rows(model, batch)
        return batch, full[batch.attention_mask], float(losses.rows_ce_sum(rows, targets)) / len(targets)

    ref_batch, ref, ref_loss = logits_and_loss(mel_data)
    got_batch, got, loss = logits_and_loss(TrainData(str(data), stage, tok, n_mels, features=again))
    assert got_batch.mel is None and ref_batch.audio_rows is None
    assert torch.equal(got_batch.input_ids, ref_batch.input_ids) and torch.equal(got_batch.labels, ref_batch.labels)
    assert got_batch.audio_rows.shape == (int((ref_batch.input_ids == tok.audio_id).sum()), 32)
    # fp32 rows: the encoder saw other batch-mates (other padding) when the cache was built; masked
    # attention makes that exact up to float summation order.
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    # fp16 rows: each layer-normed value (|x| ~ 1) rounded at 2^-11 relative (~5e-4); through two
    # layers of O(1) weights that stays well under 1% of the largest logit.
    _, got16, loss16 = logits_and_loss(TrainData(str(data), stage, tok, n_mels, features=half))
    assert 0 < (got16 - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert abs(loss16 - ref_loss) <= 1e-2 * ref_loss


def test_model_rejects_a_row_count_mismatch_and_mixed_sources(tmp_path):
    data = asr_manifest(tmp_path, n=2)
    cfg = config("sft", data, tmp_path / "out")
    tok = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tok)
    cache = FeatureCache(tmp_path / "c", model.audio_tower, 80)
    assert cache.add([str(tmp_path / f"tone-{k}-0.wav") for k in range(2)], progress=False) == 2
    rows_data = TrainData(str(data), "sft", tok, 80, features=cache)
    batch = collate([rows_data.examples(0)[0]], tok.pad_id)
    with pytest.raises(ChatFormatError, match="cached encoder rows"):
        model(batch.input_ids, audio_rows=batch.audio_rows[1:], attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="mix mel windows and cached audio_rows"):
        collate([rows_data.examples(0)[0], TrainData(str(data), "sft", tok, 80).examples(1)[0]], tok.pad_id)


def test_augment_rows_is_seeded_and_leaves_the_cache_alone():
    x = torch.randn(50, 8)
    before = x.clone()

    def run(seed, **kw):
        return augment_rows(x, torch.Generator().manual_seed(seed), **kw)

    a, b = run(1, dropout=0.25, time_masks=2, time_mask_len=4), run(1, dropout=0.25, time_masks=2, time_mask_len=4)
    assert torch.equal(a, b) and not torch.equal(a, run(2, dropout=0.25, time_masks=2, time_mask_len=4))
    assert torch.equal(x, before)
    kept = a != 0
    assert 0.6 < kept.float().mean() < 0.9  # ~75% kept, minus the masked rows
    assert torch.allclose(a[kept], x[kept] / 0.75)  # survivors scaled by 1 / (1 - p)
    masked = run(3, time_masks=3, time_mask_len=4)
    assert 1 <= int((masked.abs().sum(-1) == 0).sum()) <= 12


def cached_args(data: Path, out: Path, cache: Path) -> list[str]:
    return ["--stage", "sft", "--config", str(ROOT / "configs/test/sft.yaml"), "--data", str(data),
            "--out", str(out), "--max-steps", "9", "--save-every", "3", "--progress=false",
            f"--feature_cache={cache}", "--feature_dropout=0.3", "--feature_time_masks=1", "--freeze=[encoder]"]


def test_killed_cached_run_resumes_to_the_uninterrupted_curve(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    cache = tmp_path / "cache"

    def cfg(out: Path, *extra: str) -> TrainConfig:
        return config("sft", data, out, "max_steps=9", "save_every=3", f"feature_cache={cache}",
                      "feature_dropout=0.3", "feature_time_masks=1", "freeze=[encoder]", *extra)

    train(cfg(tmp_path / "a"))
    meta = json.loads((cache / "index.json").read_text())
    assert len(meta["items"]) == 8  # every clip encoded once, by the first run
    ref = read_metrics(tmp_path / "a")
    # SIGKILL half-way through writing the step-6 checkpoint (a fresh process, reusing the cache)
    env = {**ENV, checkpoint.KILL_ENV: "6"}
    proc = subprocess.run([sys.executable, "-m", "lalm", "train", *cached_args(data, tmp_path / "b", cache)],
                          env=env, capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path / "b" / "checkpoints")] == [3]
    train(cfg(tmp_path / "b"), resume=True)
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 10))
    for x, y in zip(rows, ref):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
    # the augmentation is live: without it the very first step already differs
    train(cfg(tmp_path / "clean", "feature_dropout=0", "feature_time_masks=0"))
    assert read_metrics(tmp_path / "clean")[0]["loss"] != ref[0]["loss"]


def test_lora_on_the_decoder_trains_on_cached_rows_as_on_mels(tmp_path):
    """Decoder adapters do not change the encoder's outputs, so they train on the cache: the same
    loss curve as the mel path up to the fp16 rows' rounding, the base weights untouched."""
    data = asr_manifest(tmp_path, n=8)
    lora = ["lora_r=4", "lora_alpha=8", "lora_target_modules=[q_proj, v_proj, down_proj]", "max_steps=6",
            "freeze=[encoder, projector, decoder]", "lr=3e-3"]
    cached = train(config("sft", data, tmp_path / "cached", *lora, f"feature_cache={tmp_path / 'c'}"))
    train(config("sft", data, tmp_path / "mels", *lora))
    a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "mels")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-2 * y["loss"], (x, y)
    assert a[-1]["loss"] < a[0]["loss"]  # the adapters learn
    from lalm.weights import load_checkpoint

    # lr 0: the exported init (the preset's seeded random weights, zero adapters merged)
    still = train(config("sft", data, tmp_path / "still", *lora, "lr=0", "max_steps=1",
                         f"feature_cache={tmp_path / 'c'}"))
    init = load_checkpoint(still.final, dtype=torch.float32).state_dict()
    final = load_checkpoint(cached.final, dtype=torch.float32).state_dict()
    moved = [k for k, v in init.items() if not torch.equal(v, final[k])]
    # only the adapted matrices move (merged into the exported weights); norms, MLP up/gate, the
    # projector and the embeddings stay the init's
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in moved), moved


def test_unreadable_clip_is_skipped_and_counted(tmp_path):
    records = [asr_record(tmp_path, k) for k in range(8)]
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really audio")
    bad = asr_record(tmp_path, 9)
    bad["messages"][0]["content"][0]["audio"] = "junk.wav"
    data = write_manifest(tmp_path / "m.jsonl", records + [bad])
    with pytest.warns(UserWarning, match="skipped 1 record"):
        result = train(config("sft", data, tmp_path / "out", "max_steps=1", f"feature_cache={tmp_path / 'c'}",
                              "freeze=[encoder]"))
    assert result.skipped == 1


@pytest.mark.parametrize("overrides, key", [
    (["freeze=[]"], "feature_cache"),
    (["freeze=[encoder]", "lora_r=4", "lora_target_modules=[q_proj]", "lora_components=[encoder, decoder]"],
     "feature_cache"),
    (["freeze=[encoder]", "augment_gain_db=3"], "augment_gain_db"),
    (["freeze=[encoder]", "augment_speed=0.1"], "augment_speed"),
    (["freeze=[encoder]", "augment_noise_snr_db=0"], "augment_noise_snr_db"),
    (["freeze=[encoder]", "feature_dropout=1.0"], "feature_dropout"),
    (["freeze=[encoder]", "feature_time_masks=-1"], "feature_time_masks"),
])
def test_feature_cache_config_errors_name_the_key(tmp_path, overrides, key):
    cfg = TrainConfig.load(ROOT / "configs/test/sft.yaml", [f"feature_cache={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=f"^{key}:"):
        cfg.validate()


@pytest.mark.parametrize("key", ["feature_dropout=0.1", "feature_time_masks=2", "feature_noise=0.1"])
def test_feature_augmentation_needs_a_feature_cache(key):
    cfg = TrainConfig.load(ROOT / "configs/test/sft.yaml", [key, "freeze=[encoder]"])
    with pytest.raises(ConfigError, match=f"^{key.split('=')[0]}: .*set feature_cache"):
        cfg.validate()


def test_tiny_demo_configs_train_on_the_cache():
    for stage in ("pretrain", "sft", "dpo"):
        cfg = TrainConfig.load(ROOT / f"configs/tiny/{stage}.yaml").validate()
        assert cfg.feature_cache and "encoder" in cfg.freeze
        assert cfg.feature_dropout == (0.0 if stage == "dpo" else 0.2)


def test_empty_eval_set_means_no_eval_rows(tmp_path):
    """(The quick demo's DPO dev split is empty: no eval rows, not scores of nothing.)"""
    from train_corpus import dpo_record

    pairs = write_manifest(tmp_path / "pairs.jsonl", [dpo_record(tmp_path, k) for k in range(4)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.warns(UserWarning, match="no usable records; the run is not evaluated"):
        train(config("dpo", pairs, tmp_path / "out", "max_steps=2", "batch_size=2", f"eval_data={tmp_path / 'empty.jsonl'}",
                     "eval_every=1", f"feature_cache={tmp_path / 'c'}", "freeze=[encoder]"))
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2] and not any(k.startswith("eval_") for r in rows for k in r)


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_cache_and_equal_one_process(tmp_path):
    """Rank 0 encodes, rank 1 waits at the barrier and reads the folder; FSDP2 over 2 ranks == 1 process."""
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    data = asr_manifest(tmp_path, n=8)
    args = ["--stage", "sft", "--config", str(ROOT / "configs/test/sft.yaml"), "--data", str(data), "--max-steps", "6",
            "--batch-size", "8", "--progress=false", "--feature_dropout=0.3", "--freeze=[encoder]"]
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "lalm", "train", *args, "--fsdp",
                           "--out", str(tmp_path / "two"), f"--feature_cache={tmp_path / 'c2'}"],
                          env=ENV, capture_output=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    train(config("sft", data, tmp_path / "one", "max_steps=6", "batch_size=8", "feature_dropout=0.3",
                 "freeze=[encoder]", f"feature_cache={tmp_path / 'c1'}"))
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"], (a, b)


def test_cache_is_keyed_by_content_not_path(tmp_path):
    """A moved clip reuses its rows; a clip rewritten in place with other audio is re-encoded."""
    import shutil

    import soundfile as sf

    model = build.build_model(TrainConfig(stage="sft", init="preset:test-tiny", tokenizer="bytes"),
                              build.build_tokenizer(TrainConfig(stage="sft", init="preset:test-tiny",
                                                                tokenizer="bytes")))
    a = tmp_path / "a"
    names = [write_audio(a, k) for k in range(2)]
    cache = FeatureCache(tmp_path / "c", model.audio_tower, model.config.audio.num_mel_bins)
    assert cache.add([a / n for n in names], progress=False) == 2
    b = tmp_path / "b"
    shutil.copytree(a, b)
    again = FeatureCache(tmp_path / "c", model.audio_tower, model.config.audio.num_mel_bins)
    assert again.add([b / n for n in names], progress=False) == 0  # same bytes elsewhere: reused
    assert torch.equal(again.get(b / names[0]), cache.get(a / names[0]))
    x, sr = sf.read(b / names[1])
    sf.write(b / names[1], x[: len(x) // 2], sr)  # same path, other audio
    fresh = FeatureCache(tmp_path / "c", model.audio_tower, model.config.audio.num_mel_bins)
    assert b / names[1] not in fresh
    assert fresh.add([b / n for n in names], progress=False) == 1
    assert fresh.tokens(b / names[1]) < fresh.tokens(a / names[1])
