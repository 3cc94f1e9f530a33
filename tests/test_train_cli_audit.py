"""`lalm train` options and config values a user types: paths taken as typed, bad YAML and
out-of-range numbers refused as a ConfigError naming the key, and --resume kept to its stage.

    .venv/bin/pytest -q tests/test_train_cli_audit.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

from lalm.errors import ConfigError
from lalm.train import cli
from lalm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_path_overrides_are_taken_as_typed():
    """String keys went through YAML: " #" started a comment, 010 was octal 8, yes was True,
    [a] a list; a manifest `runs #2/train.jsonl` was read from `runs`."""
    cases = {"runs #2/train.jsonl": "runs #2/train.jsonl", "010": "010", "yes": "yes", "[a]": "[a]",
             "x: y.jsonl": "x: y.jsonl", "1_000": "1_000", "2024-01-01": "2024-01-01"}
    for typed, expected in cases.items():
        cfg = TrainConfig()
        cfg.apply_overrides([f"--data={typed}", f"--out={typed}"])
        assert (cfg.data, cfg.out) == (expected, expected), typed
    cfg = TrainConfig(data="a.jsonl", tokenizer="tok")
    cfg.apply_overrides(["--data=", "--tokenizer=null"])  # an optional path can still be unset
    assert (cfg.data, cfg.tokenizer) == (None, None)


def test_override_yaml_syntax_errors_name_the_key():
    """A value YAML cannot parse (`@x`, a lone quote, a tab) escaped as a yaml ScannerError
    traceback; for string keys it is now simply the text."""
    for typed in ("@run", "'quoted", "a\tb", "*alias", "%x"):
        cfg = TrainConfig()
        cfg.apply_overrides([f"--data={typed}"])
        assert cfg.data == typed
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig().apply_overrides(["--lr=@x"])
    with pytest.raises(ConfigError, match="freeze"):
        TrainConfig().apply_overrides(["--freeze=[encoder"])
    with pytest.raises(ConfigError, match=r"model\.text\.x"):
        TrainConfig().apply_overrides(["model.text.x=@"])


def test_typed_overrides_still_parse():
    cfg = TrainConfig()
    cfg.apply_overrides(["--lr=1e-4", "--freeze=[encoder, decoder]", "--progress=false", "--fsdp=yes",
                         "--augment-noise-snr-db=null", "--model={text: {hidden_size: 64}}", "--init=preset:tiny"])
    assert (cfg.lr, cfg.freeze, cfg.progress, cfg.fsdp) == (1e-4, ["encoder", "decoder"], False, True)
    assert cfg.augment_noise_snr_db is None and cfg.model == {"text": {"hidden_size": 64}}
    assert cfg.init == "preset:tiny"
    with pytest.raises(ConfigError, match="unknown config key 'warmup'"):
        TrainConfig().apply_overrides(["--warmup=@"])  # the key is checked before the value


@pytest.mark.parametrize("key,value", [
    ("lr", -1e-4),  # MuonAdamW checks nothing: gradient ascent; AdamW: an unnamed ValueError
    ("lr", math.inf), ("lr", math.nan),
    ("min_lr_ratio", -0.5),  # the cosine tail went below zero: uphill steps at the end
    ("min_lr_ratio", 2.0),
    ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_eps", -1e-8), ("weight_decay", -0.1),
    ("num_threads", -1),  # torch.set_num_threads: RuntimeError traceback
    ("lora_dropout", 1.0), ("eval_every", -1),
    ("augment_speed", 1.5),  # speed factors <= 0
    ("augment_gain_db", -3.0),
])
def test_out_of_range_numbers_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**{key: value}).validate()


def test_negative_lora_rank_is_a_config_error():
    # -4 is truthy: with target modules it passed as "LoRA on" and failed later inside peft
    with pytest.raises(ConfigError, match="lora_r"):
        TrainConfig(lora_r=-4, lora_target_modules=["q_proj"]).validate()


def test_beta_is_checked_for_dpo_and_refused_elsewhere():
    for beta in (0.0, -0.1):  # 0 turns the loss into a constant; < 0 prefers the rejected answer
        with pytest.raises(ConfigError, match="beta"):
            TrainConfig(stage="dpo", beta=beta).validate()
    with pytest.raises(ConfigError, match="beta"):  # as rpo_alpha: SFT would ignore it silently
        TrainConfig(stage="sft", beta=0.5).validate()
    TrainConfig(stage="sft").validate()  # the default is no choice of the user's
    TrainConfig(stage="dpo", beta=0.5).validate()


def test_help_lists_every_config_key(capsys):
    # a guard, not a fix: every TrainConfig key must stay reachable as a flag
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        if name != "stage":
            assert f"--{name.replace('_', '-')}" in text, name
    assert "--stage" in text and "--resume" in text


def test_resume_refuses_another_stages_checkpoint(tmp_path):
    """An SFT --resume in a pre-training OUT took its step count and optimizer state as its own
    (and, past max_steps, published the pre-trained weights as OUT/final)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from train_corpus import asr_manifest

    from lalm.__main__ import main

    data = asr_manifest(tmp_path, n=4)
    base = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "4",
            "--save-every", "1", "--progress=false"]
    assert main(base + ["--stage", "pretrain", "--config", str(ROOT / "configs/test/pretrain.yaml"),
                        "--max-steps", "1"]) == 0
    with pytest.raises(ConfigError, match="pretrain checkpoint"):
        cli.check_resume(TrainConfig(stage="sft", out=str(tmp_path / "run")))
    cli.check_resume(TrainConfig(stage="pretrain", out=str(tmp_path / "run")))  # same stage: fine
    cli.check_resume(TrainConfig(stage="sft", out=str(tmp_path / "empty")))  # nothing to resume: fine
    # the command itself refuses it: exit 2 with the message, not a 2-step SFT from step 1
    assert main(base + ["--stage", "sft", "--config", str(ROOT / "configs/test/sft.yaml"),
                        "--max-steps", "2", "--resume"]) == 2
