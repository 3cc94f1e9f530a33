"""Train a Qwen2-Audio model: pre-training, SFT or DPO, on one loop (`lalm train`).

  lalm train --stage sft --config configs/test/sft.yaml --data train.jsonl --out runs/sft
  lalm train --stage dpo --config configs/qwen2-audio-7b/dpo.yaml --lr=5e-7 --beta=0.1
  torchrun --nproc_per_node=8 -m lalm train --stage sft --config ... --fsdp

Every config key (configs/*.yaml, lalm.train.config.TrainConfig) is also an option:
--key=value (dashes or underscores); preset fields with --set model.text.hidden_size=64.
--batch-size is the global batch, split across torchrun ranks. --resume continues from the
newest complete checkpoint in OUT/checkpoints. Writes OUT/metrics.jsonl, OUT/tensorboard,
OUT/loss.png, checkpoints every --save-every steps and the final model to OUT/final.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from lalm.errors import ConfigError
from lalm.train.config import STAGES, TrainConfig

_PREFIX = "cfg_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True, help="YAML file of TrainConfig keys")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, also for nested preset fields (model.text.hidden_size=64)")
    group = parser.add_argument_group("config keys (override the YAML file)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kwargs = {"dest": _PREFIX + f.name, "metavar": "VALUE", "default": None}
        if f.type in ("bool", bool):
            kwargs.update(nargs="?", const="true")  # --fsdp alone means true
        group.add_argument(*names, **kwargs)


def parse(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.load(args.config)
    with open(args.config) as f:
        in_file = set((yaml.safe_load(f) or {}).keys())
    if "stage" in in_file and cfg.stage != args.stage:
        raise ConfigError(f"{args.config}: stage is {cfg.stage!r} but --stage {args.stage}")
    cfg.stage = args.stage
    overrides = [f"{k[len(_PREFIX):]}={v}" for k, v in vars(args).items()
                 if k.startswith(_PREFIX) and v is not None]
    cfg.apply_overrides(overrides + list(args.set))
    return cfg.validate()


def check_resume(cfg: TrainConfig) -> None:
    """Refuse to --resume another stage's checkpoint in OUT. The loop would take its weights,
    optimizer moments and step count as this stage's: an SFT run resumed in a finished
    pre-training OUT started at pre-training's last step, trained nothing, and published the
    pre-trained weights as OUT/final; a DPO one failed on a "missing reference" instead."""
    from pathlib import Path

    from lalm.train import checkpoint

    found = checkpoint.newest_checkpoint(Path(cfg.out) / "checkpoints")
    if found is None:
        return
    saved = checkpoint.read_trainer_state(found).get("config", {}).get("stage", cfg.stage)
    if saved != cfg.stage:
        raise ConfigError(f"{found}: a {saved} checkpoint; --resume continues the same stage "
                          f"(this run is {cfg.stage}: give it another --out, and --init this checkpoint)")


def run(args: argparse.Namespace) -> int:
    from lalm.train.loop import train

    cfg = parse(args)
    if args.resume:
        check_resume(cfg)
    result = train(cfg, resume=args.resume)
    if result.skipped:
        print(f"lalm train: skipped {result.skipped} bad record(s) (see {result.out / 'summary.json'})",
              file=sys.stderr)
    return 0
