"""The training loop on tiny configs: overfitting ASR, DPO learning preferences, bad records,
LoRA, and a trained checkpoint read by transformers with the same logits.

    .venv/bin/pytest -q tests/test_train_loop.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_corpus import (
    PROMPT,
    WORDS,
    asr_manifest,
    asr_record,
    config,
    corrupt_flac,
    dpo_record,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread in this module)
    write_manifest,
)

import lalm
from lalm.processor import collate, prepare
from lalm.tokenizer import Tokenizer
from lalm.train.loop import train
from lalm.train.metrics import read_metrics
from lalm.weights import load_checkpoint


def greedy(model, tok: Tokenizer, messages: list, n_mels: int, max_new: int = 10) -> str:
    """Plain argmax decoding without a cache (the test's own reference loop)."""
    batch = collate([prepare(messages, tok, n_mels)], tok.pad_id)
    ids = batch.input_ids[0].tolist()
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids + out]), mel=batch.mel, mel_frames=batch.mel_frames)
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.im_end_id:
                break
            out.append(nxt)
    return tok.decode(out)


def test_tiny_model_overfits_eight_asr_examples(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    result = train(config("sft", data, tmp_path / "out", "max_steps=90", "lr=3e-3", "min_lr_ratio=1.0"))
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, 91))
    assert rows[-1]["loss"] < 0.05 < rows[0]["loss"]
    prompts = [[{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / f"tone-{k}-0.wav")},
                                             {"type": "text", "text": PROMPT}]}] for k in range(8)]
    # the reference argmax loop here, and lalm's own decoder (lalm.load -> generate.py)
    model = load_checkpoint(result.final, dtype=torch.float32)
    tok = Tokenizer.load(result.final)
    assert [greedy(model, tok, p, model.config.audio.num_mel_bins) for p in prompts] == WORDS[:8]
    outputs = lalm.load(result.final).generate(prompts, max_new_tokens=10, temperature=0.0)
    assert [o.text for o in outputs] == WORDS[:8]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    assert list((tmp_path / "out" / "tensorboard").iterdir())


def test_dpo_raises_heldout_preference_accuracy(tmp_path):
    train_set = write_manifest(tmp_path / "pairs.jsonl", [dpo_record(tmp_path, k, seed=0) for k in range(8)])
    heldout = write_manifest(tmp_path / "heldout.jsonl", [dpo_record(tmp_path, k, seed=1) for k in range(8)])
    train(config("dpo", train_set, tmp_path / "out", "max_steps=30", "lr=3e-3", f"eval_data={heldout}",
                 "eval_every=10"))
    rows = read_metrics(tmp_path / "out")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    # at step 0 the policy is the reference: every reward is 0
    assert abs(evals[0]["eval_reward_margin"]) < 1e-4
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"] and evals[-1]["eval_accuracy"] >= 0.875
    assert evals[-1]["eval_reward_margin"] > evals[1]["eval_reward_margin"] > 0
    steps = [r for r in rows if "reward_margin" in r]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert steps[-1]["accuracy"] == 1.0
    assert (tmp_path / "out" / "dpo_ref" / "train.safetensors").is_file()


def test_rpo_alpha_adds_the_chosen_nll_in_the_loop(tmp_path):
    """At the first step the policy is the reference, so every pair's DPO loss is log 2; rpo_alpha
    adds alpha x the mean per-token NLL of the chosen answers, linearly."""
    data = write_manifest(tmp_path / "pairs.jsonl", [dpo_record(tmp_path, k, seed=0) for k in range(8)])
    first = {}
    for alpha in (0.0, 1.0, 2.0):
        out = tmp_path / f"a{alpha}"
        train(config("dpo", data, out, "max_steps=1", f"rpo_alpha={alpha}"))
        first[alpha] = read_metrics(out)[0]["loss"]
    assert first[0.0] == pytest.approx(0.6931472, abs=1e-5)
    nll = first[1.0] - first[0.0]
    assert 0.5 < nll < 8.0  # a random tiny model: a few nats per token
    assert first[2.0] - first[0.0] == pytest.approx(2 * nll, rel=1e-4)


def test_bad_manifest_lines_are_skipped_and_counted(tmp_path, capsys):
    records = [asr_record(tmp_path, k) for k in range(8)]
    missing = asr_record(tmp_path, 9)
    missing["messages"][0]["content"][0]["audio"] = "nowhere.wav"
    unreadable = asr_record(tmp_path, 10)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    unreadable["messages"][0]["content"][0]["audio"] = "junk.wav"
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    lines = [json.dumps(x) for x in (missing, unreadable, bad_role, no_answer)] + ["{not json"]
    data = write_manifest(tmp_path / "mixed.jsonl", records, extra_lines=lines)
    with pytest.warns(UserWarning, match="skipped 5 record"):
        result = train(config("sft", data, tmp_path / "out", "max_steps=2"))
    assert result.skipped == 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_records"] == 5 and "mixed.jsonl:9" in summary["skipped_first"]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_record_failing_only_when_decoded_is_skipped_in_steps_eval_and_reference(tmp_path, stage):
    """Such a record used to crash the DPO reference pass and every evaluation, and a rank whose
    whole batch failed crashed the step; now it is left out of every loss and metric, and counted
    once however many epochs meet it."""
    make = asr_record if stage == "sft" else dpo_record
    bad = make(tmp_path, 5)
    bad["messages"][0]["content"][0]["audio"] = corrupt_flac(tmp_path)
    data = write_manifest(tmp_path / "m.jsonl", [make(tmp_path, k) for k in range(4)] + [bad])
    with pytest.warns(UserWarning, match="skipped 1 record.*corrupt.flac"):
        result = train(config(stage, data, tmp_path / "out", "max_steps=10", "batch_size=1", f"eval_data={data}",
                              "eval_every=5"))  # 2 epochs of 5 one-record batches
    assert result.skipped == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped_eval_records"] == 1
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert sorted(r["tokens"] for r in rows if "tokens" in r)[:2] == [0, 0]  # the bad record's two steps
    if stage == "dpo":  # at step 0 the policy is the reference: every scored pair's margin is 0
        assert rows[0]["step"] == 0 and rows[0]["eval_reward_margin"] == pytest.approx(0, abs=1e-4)


def test_lora_run_saves_merged_weights(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    cfg = config("sft", data, tmp_path / "out", "max_steps=3", "lora_r=4", "lora_alpha=8",
                 "lora_target_modules=[q_proj, v_proj]", "freeze=[encoder, decoder]")
    result = train(cfg)
    model = load_checkpoint(result.final, dtype=torch.float32)  # plain HF names: merged, no peft keys
    from lalm.train.build import build_model, build_tokenizer

    start = build_model(cfg, build_tokenizer(cfg))
    after, before = model.state_dict(), start.state_dict()
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[name], before[name])  # the adapter was merged in
    assert torch.equal(after["language_model.model.layers.0.mlp.up_proj.weight"],
                       before["language_model.model.layers.0.mlp.up_proj.weight"])  # frozen, untouched
    assert not torch.equal(after["multi_modal_projector.linear.weight"], before["multi_modal_projector.linear.weight"])
    enc = "audio_tower.layers.0.self_attn.q_proj.weight"  # lora_components defaults to the decoder only
    assert torch.equal(after[enc], before[enc])


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_lora_dropout_is_off_in_dpo_only(tmp_path, stage):
    """DPO's rewards compare the policy with a reference computed without dropout; with LoRA
    dropout on in training, the two differed by dropout noise alone (TRL disables it too)."""
    from lalm.train.build import apply_trainable, build_model, build_tokenizer

    make = asr_record if stage == "sft" else dpo_record
    data = write_manifest(tmp_path / "m.jsonl", [make(tmp_path, k) for k in range(2)])
    cfg = config(stage, data, tmp_path / "out", "lora_r=4", "lora_alpha=8", "lora_dropout=0.5",
                 "lora_target_modules=[q_proj, v_proj]")
    model = apply_trainable(build_model(cfg, build_tokenizer(cfg)), cfg).train()
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.5} if stage == "sft" else {0.0})


def test_trained_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_reference import whisper_features
    from train_corpus import tone

    data = asr_manifest(tmp_path, n=8)
    result = train(config("sft", data, tmp_path / "out", "max_steps=3", "lr=1e-2"))
    ours = load_checkpoint(result.final, dtype=torch.float32)
    ref = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(str(result.final), dtype=torch.float32).eval()
    tok = Tokenizer.load(result.final)
    n_mels = ours.config.audio.num_mel_bins
    waves = [tone(2), tone(5)]
    convs = [[{"role": "user", "content": [{"type": "audio", "audio": {"array": w, "sampling_rate": 16000}},
                                           {"type": "text", "text": "Transcribe this audio." * (1 + i)}]}]
             for i, w in enumerate(waves)]
    batch = collate([prepare(c, tok, n_mels) for c in convs], tok.pad_id)
    feats, feat_mask = whisper_features(waves, n_mels)
    with torch.no_grad():
        a = ours(batch.input_ids, batch.position_ids, batch.attention_mask, batch.mel, batch.mel_frames)
        b = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), input_features=feats,
                feature_attention_mask=feat_mask).logits
    real = batch.attention_mask
    assert torch.allclose(a[real], b[real], atol=1e-4, rtol=0), (a[real] - b[real]).abs().max()
    assert (a[real] - b[real]).abs().max() > 0 or True
    assert a[real].std() > 0.1  # trained weights, not a flat zero-logit model


def test_pretrain_stage_trains_on_raw_prompts(tmp_path):
    data = asr_manifest(tmp_path, n=8)
    result = train(config("pretrain", data, tmp_path / "out", "max_steps=6", "lr=3e-3"))
    rows = read_metrics(tmp_path / "out")
    assert rows[-1]["loss"] < rows[0]["loss"]
    # 8 examples of "<|audio_bos|><|AUDIO|>x10<|audio_eos|>Transcribe this audio." + answer + <|endoftext|>
    assert rows[0]["tokens"] == sum(12 + len(PROMPT) + len(w) + 1 for w in WORDS[:8])
    assert load_checkpoint(result.final, dtype=torch.float32).config.text.vocab_size == 262
