"""lalm demo: the cached-encoder path equals the model's own forward, the recipe keeps held-out
material out of training, and `lalm demo --quick` produces a loadable checkpoint that answers
(then a second run reuses everything)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch

from lalm import audio as A
from lalm.config import ModelConfig
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.processor import collate, prepare
from lalm.tokenizer import train_bpe
from lalm.train import cached
from lalm.train.encoder_cache import FeatureCache


def _wav(path, seconds, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * A.SAMPLE_RATE)) / A.SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    sf.write(path, wave.astype(np.float32), A.SAMPLE_RATE)
    return str(path)


@pytest.fixture(scope="module")
def small_model():
    tok = train_bpe(["hello world what is that sound transcribe this audio"] * 4, 300)
    config = ModelConfig.preset(
        "tiny", audio={"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64},
        text={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
        audio_token_index=tok.audio_id)
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():  # O(1) weights so every position matters in the comparison
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model, tok


def test_cached_features_equal_the_model_forward(small_model, tmp_path):
    model, tok = small_model
    clips = [_wav(tmp_path / f"c{i}.wav", s, i) for i, s in enumerate((1.3, 0.41, 2.77))]
    convs = [
        [{"role": "user", "content": [{"type": "audio", "audio": clips[0]}, {"type": "text", "text": "hello"}]},
         {"role": "assistant", "content": "world"}],
        [{"role": "user", "content": [{"type": "audio", "audio": clips[1]}, {"type": "audio", "audio": clips[2]},
                                      {"type": "text", "text": "what is that sound"}]},
         {"role": "assistant", "content": "hello world"}],
    ]
    cache = FeatureCache(tmp_path / "cache", model.audio_tower, 80)
    assert cache.add(clips, progress=False) == 3
    again = FeatureCache(tmp_path / "cache", model.audio_tower, 80)  # read back from disk
    assert len(again) == 3 and again.add(clips, progress=False) == 0
    examples = [prepare(c, tok, 80, add_generation_prompt=False) for c in convs]
    batch = collate(examples, tok.pad_id)
    with torch.no_grad():
        ref = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask,
                                  batch.mel, batch.mel_frames)  # (B, T, hidden)
        seqs = [cached.Seq(e.ids.tolist(), e.loss_mask.tolist(), [p["audio"] for m in c for p in
                           (m["content"] if isinstance(m["content"], list) else []) if p["type"] == "audio"])
                for e, c in zip(examples, convs)]
        ids, att, pos, labels = cached.collate(seqs, tok.pad_id)
        assert torch.equal(ids, batch.input_ids) and torch.equal(labels, batch.labels)
        feats = cached.features(seqs, again, None, None)
        ours = cached.hidden_states(model, ids, att, pos, feats)
    real = batch.attention_mask
    # the cache stores fp16 rows: equal up to that rounding
    assert (ours[real] - ref[real]).abs().max() < 2e-2 * ref[real].abs().max()
    assert feats.shape[0] == sum(e.audio_tokens for e in examples)


def test_feature_augment_masks_spans_and_leaves_the_cache_alone(small_model, tmp_path):
    model, _ = small_model
    clip = _wav(tmp_path / "a.wav", 3.0, 1)
    cache = FeatureCache(tmp_path / "cache", model.audio_tower, 80)
    cache.add([clip], progress=False)
    before = cache.get(clip).clone()
    seq = cached.Seq([0], [False], [clip])
    x = cached.features([seq], cache, cached.FeatureAugment(time_masks=3, time_mask_len=4), random.Random(0))
    zero_rows = int((x.abs().sum(-1) == 0).sum())
    assert 1 <= zero_rows <= 12
    assert torch.equal(cache.get(clip), before)


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


def test_quick_demo_end_to_end(tmp_path, capsys):
    """`lalm demo --quick`: corpus, three stages, eval, a model that loads and answers; rerun reuses."""
    import lalm
    from lalm.__main__ import main
    from lalm.train.cached import load_records

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
    assert {"before", "after"} <= set(saved["dpo"])
    assert (home / "demo-quick" / "loss_curves.png").is_file() and (home / "demo-quick" / "metrics.png").is_file()

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
