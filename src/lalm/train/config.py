"""`TrainConfig`: every knob of `lalm train`, read from YAML and overridden by `--key=value`.

One flat dataclass (plus `model` overrides for the preset) so a run is described by one
YAML file, and the exact config a run used is written next to its checkpoints. Unknown keys
are errors, never silently ignored: a typo in `lerning_rate` must not train with the default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lalm.errors import ConfigError

STAGES = ("pretrain", "sft", "dpo")
COMPONENTS = ("encoder", "projector", "decoder")
# Fields that name files or folders: a leading ~ is the user's home, as on the command line
# (where the shell expands it); in a YAML config nothing else would.
PATH_FIELDS = ("init", "encoder_init", "decoder_init", "tokenizer", "data", "eval_data", "feature_cache", "out")


@dataclass
class TrainConfig:
    stage: str = "sft"  # pretrain | sft | dpo

    # --- model initialisation -------------------------------------------------------------
    # "preset:NAME" builds a randomly initialised model from lalm.config.PRESETS (+ `model`
    # overrides); anything else is a checkpoint folder (HF format, as lalm writes it).
    init: str = "preset:tiny"
    model: dict = field(default_factory=dict)  # ModelConfig.preset(name, **model) overrides
    encoder_init: str | None = None  # HF Whisper folder / .safetensors, or CTranslate2 model.bin
    decoder_init: str | None = None  # Qwen2 checkpoint folder (HF Qwen2ForCausalLM keys)
    tokenizer: str | None = None  # tokenizer folder; default: the init checkpoint's

    # --- data -------------------------------------------------------------------------------
    data: str | None = None  # training manifest (jsonl)
    eval_data: str | None = None  # held-out manifest, scored every eval_every steps
    eval_every: int = 0
    train_on: str = "all"  # SFT/DPO: loss on all assistant turns or only the last
    max_length: int = 4096  # longer examples are skipped (counted), never truncated
    length_grouping: bool = True  # batch examples of similar length to waste less padding
    augment_gain_db: float = 0.0  # random gain in [-x, +x] dB
    augment_speed: float = 0.0  # random speed factor in [1-x, 1+x]
    augment_noise_snr_db: float | None = None  # white noise at this SNR (dB), None = off
    # Frozen encoder, cached: its outputs for every clip of data + eval_data are computed once
    # and kept in this folder (encoder_cache.FeatureCache); steps then start at the projector.
    # On a CPU the encoder costs about as much per clip as a decoder training pass.
    feature_cache: str | None = None
    # Augmentation of the cached rows (the waveform is never re-encoded), pretrain/SFT only:
    feature_dropout: float = 0.0  # elementwise dropout on the rows (scaled by 1 / (1 - p))
    feature_time_masks: int = 0  # spans of rows zeroed per clip
    feature_time_mask_len: int = 4  # at most this many rows per span (25 rows = 1 s)
    feature_noise: float = 0.0  # std of Gaussian noise added to the (layer-normed) rows

    # --- optimisation -----------------------------------------------------------------------
    max_steps: int = 100
    batch_size: int = 8  # global batch (examples, or pairs for DPO), split across ranks
    micro_batch_size: int = 0  # examples (DPO: pairs) per forward on one rank; 0 = the whole rank batch
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # adamw | muon: Muon (train/muon.py) on the decoder layers' matrices, AdamW on the rest;
    # muon_lr_ratio scales the schedule's lr for the Muon matrices (after Moonlight's RMS match).
    optimizer: str = "adamw"
    muon_lr_ratio: float = 3.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16
    freeze: list = field(default_factory=list)  # any of encoder, projector, decoder
    lora_r: int = 0  # 0 = no LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # off in DPO whatever it says (as TRL's disable_dropout)
    lora_target_modules: list = field(default_factory=list)  # e.g. [q_proj, v_proj]
    lora_components: list = field(default_factory=lambda: ["decoder"])  # where those names are adapted
    beta: float = 0.1  # DPO temperature (Eq. 2); 0.1 as LLaMA-Factory / ms-swift
    rpo_alpha: float = 0.0  # DPO only: + rpo_alpha x the chosen answer's per-token NLL (RPO; 0 = Eq. 2 alone)

    # --- run --------------------------------------------------------------------------------
    seed: int = 0
    out: str = "runs/train"
    save_every: int = 0  # 0 = only the final model
    keep_checkpoints: int = 2  # the newest N step-* folders are kept; 0 = keep every one
    log_every: int = 1
    fsdp: bool = False
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # CPU threads per process; 0 = torch's default (shared CPUs: 1 is often faster)
    progress: bool = True

    def validate(self) -> TrainConfig:
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        if self.stage not in STAGES:
            raise ConfigError(f"stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.train_on not in ("all", "last"):
            raise ConfigError(f"train_on: {self.train_on!r} is not 'all' or 'last'")
        for c in self.freeze:
            if c not in COMPONENTS:
                raise ConfigError(f"freeze: {c!r} is not one of {', '.join(COMPONENTS)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: {self.precision!r} is not auto, fp32 or bf16")
        for name in ("max_steps", "batch_size", "log_every", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0 or self.save_every < 0 or self.warmup_steps < 0 or self.keep_checkpoints < 0:
            raise ConfigError("micro_batch_size, save_every, warmup_steps and keep_checkpoints must be >= 0")
        self._validate_numbers()
        for c in self.lora_components:
            if c not in COMPONENTS:
                raise ConfigError(f"lora_components: {c!r} is not one of {', '.join(COMPONENTS)}")
        if self.rpo_alpha < 0 or (self.rpo_alpha and self.stage != "dpo"):
            raise ConfigError(f"rpo_alpha: must be >= 0 and is for stage dpo only, got {self.rpo_alpha}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer: {self.optimizer!r} is not adamw or muon")
        if self.optimizer == "muon" and self.muon_lr_ratio <= 0:
            raise ConfigError(f"muon_lr_ratio: must be > 0, got {self.muon_lr_ratio}")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("optimizer: muon orthogonalises whole matrices and FSDP shards them; use adamw with fsdp")
        if self.optimizer == "muon" and self.lora_r:
            raise ConfigError("optimizer: muon is for full training of the decoder, not LoRA (lora_r > 0); use adamw")
        if self.lora_r and not self.lora_target_modules:
            raise ConfigError("lora_target_modules: LoRA (lora_r > 0) needs target module names")
        self._validate_feature_cache()
        return self

    def _validate_numbers(self) -> None:
        # Out-of-range optimiser values either crash deep in setup with an unnamed torch
        # ValueError (AdamW's lr/betas/eps checks, set_num_threads) or, worse, train silently
        # wrong: a negative lr (MuonAdamW checks nothing) or min_lr_ratio < 0 steps uphill,
        # beta <= 0 turns DPO off or reverses the preference, augment_speed >= 1 draws speed
        # factors <= 0.
        if not (math.isfinite(self.lr) and self.lr >= 0):  # 0 is allowed: exports the init unchanged
            raise ConfigError(f"lr: must be a finite number >= 0, got {self.lr}")
        ranges = {"min_lr_ratio": (0.0, 1.0, True), "adam_beta1": (0.0, 1.0, False),
                  "adam_beta2": (0.0, 1.0, False), "lora_dropout": (0.0, 1.0, False),
                  "augment_speed": (0.0, 1.0, False)}
        for key, (low, high, closed) in ranges.items():
            v = getattr(self, key)
            if not (low <= v <= high if closed else low <= v < high):
                raise ConfigError(f"{key}: must be in [{low:g}, {high:g}{']' if closed else ')'}, got {v}")
        for key in ("weight_decay", "adam_eps", "num_threads", "lora_r", "eval_every", "augment_gain_db"):
            if not getattr(self, key) >= 0:  # `not >=` so that nan is refused too
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.stage == "dpo" and not self.beta > 0:
            raise ConfigError(f"beta: the DPO temperature must be > 0, got {self.beta}")
        if self.stage != "dpo" and self.beta != TrainConfig.beta:  # as rpo_alpha: ignored there, so refused
            raise ConfigError(f"beta: the DPO temperature, for stage dpo only (this run is {self.stage})")

    def _validate_feature_cache(self) -> None:
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ConfigError(f"feature_dropout: must be in [0, 1), got {self.feature_dropout}")
        for key in ("feature_time_masks", "feature_time_mask_len", "feature_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.feature_cache:
            for key in ("feature_dropout", "feature_time_masks", "feature_noise"):
                if getattr(self, key):
                    raise ConfigError(f"{key}: augments cached encoder rows; set feature_cache (a folder) too")
            return
        if "encoder" not in self.freeze:
            raise ConfigError("feature_cache: cached encoder outputs need the encoder frozen (freeze: [encoder])")
        if self.lora_r and "encoder" in self.lora_components:
            raise ConfigError("feature_cache: not with LoRA adapters in the encoder (lora_components has encoder): "
                              "they change its outputs, so they cannot be computed once")
        waveform = {"augment_gain_db": self.augment_gain_db != 0, "augment_speed": self.augment_speed != 0,
                    "augment_noise_snr_db": self.augment_noise_snr_db is not None}
        for key, on in waveform.items():
            if on:
                raise ConfigError(f"{key}: waveform augmentation cannot apply to cached encoder outputs "
                                  "(feature_cache is set); use feature_dropout / feature_time_masks / feature_noise")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"{source}: unknown config key {key!r}")
        cfg = cls()
        for key, value in d.items():
            setattr(cfg, key, _coerce(cls, key, value, source))
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config is a mapping of key: value")
        cfg = cls.from_dict(raw, source=str(path))
        cfg.apply_overrides(overrides)
        return cfg

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply `key=value` (or `--key=value`, `model.key=value`) strings in order."""
        known = {f.name for f in dataclasses.fields(self)}
        for item in overrides:
            text = item.removeprefix("--")
            if "=" not in text:
                raise ConfigError(f"override {item!r}: expected --key=value")
            key, value = text.split("=", 1)
            key = key.replace("-", "_")
            if key not in known and not key.startswith("model."):
                raise ConfigError(f"override {item!r}: unknown config key {key!r}")
            if key in known and _is_text(type(self), key):
                # A path or name is the text as typed: YAML would cut `run #2.jsonl` at the #,
                # read `--out=010` as the octal 8 and `--data=yes` as True, and a leading @ or '
                # is a YAML syntax error. Only "" and null still unset an optional field.
                parsed = None if value in ("", "null") else value
            else:
                try:
                    parsed = yaml.safe_load(value) if value != "" else None
                except yaml.YAMLError as e:  # the key must be named, not a yaml traceback shown
                    raise ConfigError(f"override {item!r}: {key}: {value!r} is not a YAML value "
                                      f"({str(e).splitlines()[0]})") from None
            if key.startswith("model."):  # model.text.hidden_size=64 -> model["text"]["hidden_size"]
                path = key.split(".")[1:]
                model = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model.items()}
                node = model
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                    if not isinstance(node, dict):
                        raise ConfigError(f"override {item!r}: model.{part} is not a mapping")
                node[path[-1]] = parsed
                self.model = model
                continue
            setattr(self, key, _coerce(type(self), key, parsed, "override"))


def _is_text(cls, key: str) -> bool:
    """Whether field `key` is declared `str` or `str | None`."""
    hint = typing.get_type_hints(cls)[key]
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and [a for a in typing.get_args(hint) if a is not type(None)] == [str])


def _coerce(cls, key: str, value, source: str):
    """Check/convert `value` to the declared type of field `key` (YAML reads 1e-4 as a string)."""
    hint = typing.get_type_hints(cls)[key]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            return str(value)
        if hint is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return list(value)
        if hint is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: {key} expects {hint.__name__}, got {value!r}")
