"""Trainer units: DPO Eq. 2 by hand, masked CE against torch, which positions carry loss per
stage, and the config (unknown keys, overrides, every YAML under configs/ parses).

    .venv/bin/pytest -q tests/test_train_losses.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lalm.data.manifest import load_records
from lalm.errors import ConfigError
from lalm.train import losses
from lalm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# --- DPO -------------------------------------------------------------------------------------------


def test_dpo_loss_equals_hand_computed_eq2():
    pc = torch.tensor([-4.0, -10.0, -2.5])  # log pi(y_w | x)
    pr = torch.tensor([-6.0, -9.0, -2.5])  # log pi(y_l | x)
    rc = torch.tensor([-5.0, -9.5, -3.0])  # log ref(y_w | x)
    rr = torch.tensor([-5.5, -9.5, -2.0])  # log ref(y_l | x)
    beta = 0.1
    out = losses.dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        z = beta * (pc[i] - rc[i]).item() - beta * (pr[i] - rr[i]).item()
        expected = -math.log(1.0 / (1.0 + math.exp(-z)))
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-6)
        assert out.margins[i].item() == pytest.approx(z, abs=1e-6)
    # pair 0: z = 0.1*1 - 0.1*(-0.5) = 0.15; pair 1: 0.1*(-0.5) - 0.1*0.5 = -0.1; pair 2: 0.05 + 0.05
    assert out.margins.tolist() == pytest.approx([0.15, -0.1, 0.1], abs=1e-6)
    assert out.accuracy.item() == pytest.approx(2 / 3)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.05, 0.05], abs=1e-6)


def test_rpo_alpha_adds_the_chosen_per_token_nll():
    pc, pr = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -9.0])
    rc, rr = torch.tensor([-5.0, -9.5]), torch.tensor([-5.5, -9.5])
    plain = losses.dpo_loss(pc, pr, rc, rr, 0.1)
    rpo = losses.dpo_loss(pc, pr, rc, rr, 0.1, rpo_alpha=0.5, chosen_tokens=torch.tensor([2, 5]))
    # + 0.5 * (4 / 2) and + 0.5 * (10 / 5): per-token NLL of the chosen answer
    assert (rpo.losses - plain.losses).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert torch.equal(rpo.margins, plain.margins)  # rewards are DPO's alone
    with pytest.raises(ValueError, match="chosen_tokens"):
        losses.dpo_loss(pc, pr, rc, rr, 0.1, rpo_alpha=0.5)
    with pytest.raises(ConfigError, match="rpo_alpha"):
        TrainConfig(stage="sft", rpo_alpha=1.0).validate()
    with pytest.raises(ConfigError, match="rpo_alpha"):
        TrainConfig(stage="dpo", rpo_alpha=-1.0).validate()


def test_dpo_default_beta_and_stability():
    assert TrainConfig().beta == 0.1
    z = torch.tensor([-1e4])
    out = losses.dpo_loss(z, torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert torch.isfinite(out.losses).all() and out.losses.item() == pytest.approx(1e3, rel=1e-6)


def test_sequence_logps_and_rows_match_full_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.full((3, 7), -100)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[2, 6] = 10
    logp = torch.log_softmax(logits, -1)
    expected = torch.tensor([logp[0, 2, 1] + logp[0, 3, 2] + logp[0, 4, 3], 0.0, logp[2, 6, 10]])
    assert torch.allclose(losses.sequence_logps(logits, labels), expected, atol=1e-6)
    sel = labels != -100
    rows = losses.rows_sequence_logps(logits[sel], labels[sel], sel.nonzero()[:, 0], 3)
    assert torch.allclose(rows, expected, atol=1e-6)
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert losses.masked_ce(logits, labels).item() == pytest.approx(ref.item(), abs=1e-6)
    assert losses.rows_ce_sum(logits[sel], labels[sel]).item() == pytest.approx(4 * ref.item(), abs=1e-5)


# --- which positions carry loss, per stage --------------------------------------------------------


def _byte_tokens(text: str, specials: dict[str, int]) -> list[str]:
    """Hand tokenisation for the bytes tokenizer: a special token is one id, anything else one per byte."""
    out, i = [], 0
    while i < len(text):
        for s in specials:
            if text.startswith(s, i):
                out.append(s)
                i += len(s)
                break
        else:
            out += [chr(b) for b in text[i].encode()]
            i += 1
    return out


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory):
    from train_corpus import write_audio, write_manifest

    folder = tmp_path_factory.mktemp("mask")
    audio = write_audio(folder, 0)  # 0.4 s: 40 mel frames -> 10 audio tokens
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    sft = write_manifest(folder / "sft.jsonl", [{"messages": messages}])
    dpo = write_manifest(folder / "dpo.jsonl", [{"messages": messages[:3], "chosen": "good", "rejected": "bad"}])
    return sft, dpo


def _targets(example) -> tuple[list[int], list[int]]:
    """(positions t whose label is set, the token ids they predict) from the collated labels."""
    from lalm.processor import collate

    labels = collate([example], pad_id=0).labels[0]
    pos = [t for t in range(len(labels)) if labels[t] != -100]
    return pos, [int(labels[t]) for t in pos]


@pytest.mark.parametrize("stage,train_on", [("pretrain", "all"), ("sft", "all"), ("sft", "last"), ("dpo", "last")])
def test_loss_positions_per_stage(multi_turn, stage, train_on):
    from lalm.tokenizer import bytes_to_unicode, train_bpe
    from lalm.train.data import TrainData

    tok = train_bpe([], 262)
    specials = {s: tok.tk.token_to_id(s) for s in
                ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")}
    sft, dpo = multi_turn
    data = TrainData(str(dpo if stage == "dpo" else sft), stage, tok, 80, train_on=train_on)
    examples = data.examples(0)
    audio = "<|audio_bos|>" + "<|AUDIO|>" * 10 + "<|audio_eos|>"
    head = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\nAudio 1: {audio}\nHi<|im_end|>\n")
    if stage == "pretrain":  # raw base-model form: prompt turns joined, last answer + <|endoftext|>
        segments = [(f"{audio}HiA1Q2", False), ("A2<|endoftext|>", True)]
    elif stage == "sft":
        segments = [(head + "<|im_start|>assistant\n", False), ("A1<|im_end|>", train_on == "all"),
                    ("\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", False), ("A2<|im_end|>", True),
                    ("\n", False)]
    else:
        segments = []
    expected_examples = [segments] if stage != "dpo" else [
        [(head + "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
          False), (answer + "<|im_end|>", True), ("\n", False)] for answer in ("good", "bad")]
    assert len(examples) == len(expected_examples)
    for example, segs in zip(examples, expected_examples):
        tokens, target = [], []
        for text, is_target in segs:
            toks = _byte_tokens(text, specials)
            tokens += toks
            target += [is_target] * len(toks)
        byte_token = bytes_to_unicode()  # byte -> the BPE's printable symbol for it
        ids = [specials[t] if t in specials else tok.tk.token_to_id(byte_token[ord(t)]) for t in tokens]
        assert example.ids.tolist() == ids
        # label t is the target for position t, i.e. the token at t + 1
        pos, predicted = _targets(example)
        want = [t - 1 for t in range(len(tokens)) if target[t]]
        assert pos == want
        assert predicted == [ids[t + 1] for t in want]
        # the same, read as text: exactly the answers (and their end tokens) are learned
        learned = "".join(tokens[t + 1] for t in pos)
        assert learned == "".join(text for text, is_target in segs if is_target)


def test_pretrain_line_in_chat_format_renders_as_sft(multi_turn, tmp_path):
    """A pre-training record with "format": "chat" is the SFT example, ids and labels; "raw" (the
    default) stays the base-model form; any other format is a bad record, skipped and counted."""
    from train_corpus import write_manifest

    from lalm.tokenizer import train_bpe
    from lalm.train.data import TrainData

    tok = train_bpe([], 262)
    sft, _ = multi_turn
    rec = load_records(sft)[0]
    path = write_manifest(tmp_path / "pt.jsonl", [{**rec, "format": "chat"}, {**rec, "format": "raw"}, rec,
                                                  {**rec, "format": "html"}])
    with pytest.warns(UserWarning, match=r"skipped 1 record"):
        data = TrainData(str(path), "pretrain", tok, 80)
    assert len(data) == 3
    want = TrainData(str(sft), "sft", tok, 80).examples(0)[0]
    chat_ex, raw_ex, default_ex = (data.examples(i)[0] for i in range(3))
    assert chat_ex.ids.tolist() == want.ids.tolist() and _targets(chat_ex) == _targets(want)
    assert raw_ex.ids.tolist() == default_ex.ids.tolist() != want.ids.tolist()
    assert "format 'html' is not 'raw' or 'chat'" in data.skipped.summary()
    with pytest.warns(UserWarning, match="format 'raw' is for pre-training; sft renders"):
        assert len(TrainData(str(path), "sft", tok, 80)) == 2  # chat and no format; raw and html skipped


def test_dpo_pair_is_length_filtered_by_its_longer_sequence(tmp_path):
    """A pair is two sequences, prompt + chosen and prompt + rejected: the longer one must fit
    max_length, not the prompt plus both answers (which skipped pairs that fit as "over max_length")."""
    from train_corpus import dpo_record, write_manifest

    from lalm.tokenizer import train_bpe
    from lalm.train.data import TrainData

    tok = train_bpe([], 262)
    rec = {**dpo_record(tmp_path, 0), "chosen": "a" * 150, "rejected": "b" * 120}
    path = str(write_manifest(tmp_path / "pairs.jsonl", [rec]))
    data = TrainData(path, "dpo", tok, 80)
    longest = max(len(e) for e in data.examples(0))
    assert data.lengths == [longest]
    assert len(TrainData(path, "dpo", tok, 80, max_length=longest)) == 1  # it fits: kept
    with pytest.warns(UserWarning, match="over max_length"):
        assert len(TrainData(path, "dpo", tok, 80, max_length=longest - 1)) == 0


def test_length_filter_counts_every_30_s_window_of_long_audio(tmp_path):
    """A 70 s clip is ~1750 audio tokens (windows of <= 30 s, each encoded): the header estimate
    must not stop at one window's 750, or over-long examples pass the filter. A clip too short
    for one audio token is a bad record when the manifest is read."""
    import numpy as np
    import soundfile as sf
    from train_corpus import asr_record, write_manifest

    from lalm.tokenizer import train_bpe
    from lalm.train.data import TrainData

    tok = train_bpe([], 262)
    sf.write(tmp_path / "long.wav", 0.1 * np.random.default_rng(0).standard_normal(70 * 16000), 16000)
    sf.write(tmp_path / "blip.wav", np.zeros(100, dtype=np.float32), 16000)
    long, blip = asr_record(tmp_path, 0), asr_record(tmp_path, 1)
    long["messages"][0]["content"][0]["audio"] = "long.wav"
    blip["messages"][0]["content"][0]["audio"] = "blip.wav"
    path = str(write_manifest(tmp_path / "m.jsonl", [long]))
    data = TrainData(path, "sft", tok, 80)
    actual = len(data.examples(0)[0])
    assert abs(data.lengths[0] - actual) <= 3  # off by at most a token per window
    with pytest.warns(UserWarning, match="over max_length"):
        assert len(TrainData(path, "sft", tok, 80, max_length=actual - 20)) == 0
    with pytest.warns(UserWarning, match="too short"):
        assert len(TrainData(str(write_manifest(tmp_path / "b.jsonl", [blip])), "sft", tok, 80)) == 0


# --- config ----------------------------------------------------------------------------------------


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: sft\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match="warmup"):
        TrainConfig().apply_overrides(["--warmup=3"])
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig().apply_overrides(["--max-steps=many"])


def test_counts_and_lengths_below_one_are_config_errors():
    # log_every=0 used to pass validation and then divide by zero after the first step
    for key in ("log_every", "max_length"):
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{key: 0}).validate()
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=-1).validate()  # 0 keeps every checkpoint; below it is a typo
    TrainConfig(keep_checkpoints=0).validate()


def test_paths_in_a_yaml_config_expand_the_home_folder(tmp_path, monkeypatch):
    """`init: ~/ckpt` in a YAML file reached the loader as a folder literally named '~'
    (the shell expands it on the command line, YAML does not)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("stage: sft\ninit: ~/ckpt\ndata: ~/data/train.jsonl\nout: ~/runs/a\ntokenizer: preset-free\n")
    cfg = TrainConfig.load(path).validate()
    assert (cfg.init, cfg.data, cfg.out) == (str(tmp_path / "ckpt"), str(tmp_path / "data/train.jsonl"),
                                             str(tmp_path / "runs/a"))
    assert cfg.tokenizer == "preset-free" and cfg.eval_data is None  # other values untouched


def test_overrides_are_typed():
    cfg = TrainConfig()
    cfg.apply_overrides(["--lr=1e-4", "--max-steps=7", "--freeze=encoder,projector", "--fsdp=true",
                         "model.text.hidden_size=64", "--augment-noise-snr-db=20"])
    assert (cfg.lr, cfg.max_steps, cfg.freeze, cfg.fsdp) == (1e-4, 7, ["encoder", "projector"], True)
    assert cfg.model == {"text": {"hidden_size": 64}} and cfg.augment_noise_snr_db == 20.0
    with pytest.raises(ConfigError, match="freeze"):
        TrainConfig(freeze=["tower"]).validate()


def test_cli_flags_and_key_value(tmp_path):
    import argparse

    from lalm.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--stage", "dpo", "--config", str(ROOT / "configs/test/dpo.yaml"), "--max-steps", "3",
                              "--batch-size=4", "--fsdp", "--beta=0.2", "--set", "model.text.num_hidden_layers=1"])
    cfg = cli.parse(args)
    assert (cfg.stage, cfg.max_steps, cfg.batch_size, cfg.fsdp, cfg.beta) == ("dpo", 3, 4, True, 0.2)
    assert cfg.model["text"]["num_hidden_layers"] == 1 and cfg.model["text"]["hidden_size"] == 64
    args = parser.parse_args(["--stage", "sft", "--config", str(ROOT / "configs/test/dpo.yaml")])
    with pytest.raises(ConfigError, match="stage"):
        cli.parse(args)


CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# The demo's recipe files sit beside its stage configs and are read by lalm.train.recipe.
RECIPE_FILES = {"demo.yaml", "quick.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses(path):
    if path.name in RECIPE_FILES:
        from lalm.train.recipe import Recipe

        Recipe.load(path.parent, quick=path.name == "quick.yaml")
        return
    cfg = TrainConfig.load(path).validate()
    assert cfg.stage in ("pretrain", "sft", "dpo")
    if cfg.init.startswith("preset:"):  # the model it describes must build (on the meta device: no memory)
        from lalm.config import ModelConfig

        name = cfg.init.split(":", 1)[1]
        ModelConfig.preset(name, **cfg.model)


# --- data schedule and augmentation ---------------------------------------------------------------


def test_batches_are_deterministic_length_grouped_and_sharded(tmp_path):
    from train_corpus import asr_record, write_manifest

    from lalm.tokenizer import train_bpe
    from lalm.train.data import TrainData, rank_slice

    recs = [asr_record(tmp_path, k % 4, prompt="x" * (5 + 7 * k)) for k in range(12)]  # lengths differ
    data = TrainData(str(write_manifest(tmp_path / "m.jsonl", recs)), "sft", train_bpe([], 262), 80, seed=3)
    e0 = data.epoch_batches(0, 4)
    assert e0 == data.epoch_batches(0, 4)  # a pure function of (seed, epoch): resume replays it
    assert e0 != data.epoch_batches(1, 4)
    assert sorted(i for b in e0 for i in b) == list(range(12))
    for b in e0:  # one mega-batch here: every batch is a run of the length order
        assert [data.lengths[i] for i in b] == sorted((data.lengths[i] for i in b), reverse=True)
    assert rank_slice(e0[0], 0, 2) + rank_slice(e0[0], 1, 2) == e0[0]
    data.records = data.records[:11]  # an incomplete last batch is dropped
    assert data.batches_per_epoch(4) == 2


def test_augmentation_is_seeded_and_does_what_it_says():
    import numpy as np
    from train_corpus import tone

    from lalm.train.data import augment_wave

    wave = tone(3, seconds=1.0)
    a = augment_wave(wave, np.random.default_rng([0, 1, 2]), gain_db=6, speed=0.1, noise_snr_db=10)
    b = augment_wave(wave, np.random.default_rng([0, 1, 2]), gain_db=6, speed=0.1, noise_snr_db=10)
    assert np.array_equal(a, b)
    assert 0.9 * len(wave) <= len(augment_wave(wave, np.random.default_rng(1), speed=0.1)) <= 1.12 * len(wave)
    g = augment_wave(wave, np.random.default_rng(5), gain_db=6)
    ratio = 20 * np.log10(np.abs(g).max() / np.abs(wave).max())
    assert -6.01 <= ratio <= 6.01 and abs(ratio) > 0.01
    noisy = augment_wave(wave, np.random.default_rng(7), noise_snr_db=10)
    snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean((noisy - wave).astype(np.float64) ** 2))
    assert abs(snr - 10) < 0.5
