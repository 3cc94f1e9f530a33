"""Build what a run trains: tokenizer, model (preset / checkpoint / Whisper + Qwen2 imports),
frozen components, LoRA adapters; and turn a trained state back into an HF-format folder.

`init` is either `preset:NAME` (random weights, HF-style N(0, initializer_range) init, Whisper's
sinusoids in the encoder's frozen position table) or a checkpoint folder. `encoder_init` /
`decoder_init` then overwrite the encoder / decoder (importers.py).

LoRA: peft's `inject_adapter_in_model` replaces each targeted nn.Linear in place (no wrapper
model, so the other names stay the checkpoint's). `freeze` decides which *base* weights train;
adapters always train. Saving merges `W + (alpha / r) * B @ A` into plain HF tensors, so the
saved folder loads anywhere without peft; the unmerged trainable tensors go to the trainer
state for `--resume`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lalm import weights
from lalm.config import ModelConfig
from lalm.errors import CheckpointError, ConfigError
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.tokenizer import Tokenizer, train_bpe
from lalm.train import importers
from lalm.train.config import TrainConfig

PRESET = "preset:"
BYTES_TOKENIZER = "bytes"  # 256 byte tokens + the 6 specials: no file needed (test configs)
COMPONENT_PREFIX = {"encoder": "audio_tower.", "projector": "multi_modal_projector.", "decoder": "language_model."}


def build_tokenizer(cfg: TrainConfig) -> Tokenizer:
    if cfg.tokenizer == BYTES_TOKENIZER:
        return train_bpe([], 256 + 6)
    path = cfg.tokenizer or (None if cfg.init.startswith(PRESET) else cfg.init)
    if path is None:
        raise ConfigError(f"tokenizer: init {cfg.init!r} is a preset, so name a tokenizer folder (or 'bytes')")
    return Tokenizer.load(path)


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Preset + `model` overrides; vocabulary size and special ids follow the tokenizer unless set."""
    overrides = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.model.items()}
    text = overrides.setdefault("text", {})
    if ("hidden_size" in text or "num_attention_heads" in text) and "head_dim" not in text:
        text["head_dim"] = None  # derive hidden_size // heads rather than keep the preset's head_dim
    text.setdefault("vocab_size", tokenizer.vocab_size)
    text.setdefault("bos_token_id", tokenizer.endoftext_id)
    text.setdefault("eos_token_id", tokenizer.im_end_id)
    overrides.setdefault("audio_token_index", tokenizer.audio_id)
    return ModelConfig.preset(cfg.init[len(PRESET):], **overrides)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table (length, channels): sin half then cos half."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def init_weights(model: Qwen2AudioForConditionalGeneration) -> None:
    """transformers' init for both halves: N(0, initializer_range) weights, zero biases, unit norms."""
    std = model.config.text.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        pos = model.audio_tower.embed_positions.weight
        pos.copy_(sinusoids(*pos.shape))


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> Qwen2AudioForConditionalGeneration:
    """The starting model in fp32 on CPU (moved and sharded by the loop), before freezing/LoRA."""
    if cfg.init.startswith(PRESET):
        torch.manual_seed(cfg.seed)  # every rank builds the same random model
        model = Qwen2AudioForConditionalGeneration(model_config(cfg, tokenizer))
        init_weights(model)
    else:
        if cfg.model:
            raise ConfigError(f"model: overrides apply to presets only; {cfg.init} has its own config.json")
        model = weights.load_checkpoint(cfg.init, dtype=torch.float32)
    if cfg.encoder_init:
        importers.load_encoder(model, cfg.encoder_init)
    if cfg.decoder_init:
        importers.load_decoder(model, cfg.decoder_init)
    c = model.config
    if c.audio_token_index != tokenizer.audio_id:
        raise ConfigError(f"the model's audio_token_index {c.audio_token_index} is not the tokenizer's "
                          f"<|AUDIO|> id {tokenizer.audio_id}")
    if tokenizer.vocab_size > c.text.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                          f"{c.text.vocab_size}")
    return model.float().train()


def component(name: str) -> str:
    for comp, prefix in COMPONENT_PREFIX.items():
        if name.startswith(prefix):
            return comp
    raise KeyError(name)


def apply_trainable(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Inject LoRA adapters (if configured), then set requires_grad per component."""
    if cfg.lora_r:
        from peft import LoraConfig, inject_adapter_in_model

        # q_proj exists in the encoder and the decoder: a regex over full module names keeps
        # the adapters inside lora_components.
        prefixes = "|".join(re.escape(COMPONENT_PREFIX[c]) for c in cfg.lora_components)
        names = "|".join(re.escape(n) for n in cfg.lora_target_modules)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=rf"^(?:{prefixes}).*\.(?:{names})$")
        try:
            model = inject_adapter_in_model(lora, model)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ConfigError(f"lora_target_modules: {e}") from None
    if cfg.stage == "dpo":
        # The rewards compare the policy's log-probs with the reference's, which are computed
        # without dropout: with LoRA dropout on, the two differ at step 0 and every reward carries
        # that noise. TRL's DPOTrainer (disable_dropout=True, its default) turns dropout off too.
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or component(name) not in cfg.freeze)
    model.audio_tower.embed_positions.requires_grad_(False)  # a fixed table, never trained
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze: every parameter is frozen; nothing would train")
    return model


def lora_scaling(cfg: TrainConfig) -> float:
    return cfg.lora_alpha / cfg.lora_r if cfg.lora_r else 0.0


def export_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A (possibly LoRA-injected) state dict -> plain HF tensor names, adapters merged in."""
    out = {}
    for name, t in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, leaf = name.split(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"].float()
                b = state[f"{prefix}.lora_B.default.weight"].float()
                t = (t.float() + scaling * (b @ a)).to(t.dtype)
            name = f"{prefix}.{leaf}"
        out[name] = t
    return out


def save_hf(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer, folder: Path) -> None:
    """Write an HF-format folder (config.json, safetensors, tokenizer) from plain HF tensors."""
    with torch.device("meta"):
        shell = Qwen2AudioForConditionalGeneration(config)
    shell.load_state_dict(state, strict=True, assign=True)  # no copy: the shell borrows the tensors
    weights.save_checkpoint(shell, folder)
    tokenizer.save(folder)


def load_hf_state(model: torch.nn.Module, folder: Path) -> None:
    """Overwrite a (non-LoRA) model's tensors with those of an HF-format folder, strictly."""
    files = weights.checkpoint_files(folder)
    from safetensors import safe_open

    state = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[weights.released_name(name)] = f.get_tensor(name)
    own = model.state_dict()
    if model.config.text.tie_word_embeddings:
        state.setdefault(weights.TIED_HEAD, state.get("language_model.model.embed_tokens.weight"))
    weights.check_tensors({k: tuple(v.shape) for k, v in own.items()},
                          {k: tuple(v.shape) for k, v in state.items()}, folder)
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(state[name])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.requires_grad and name not in tensors:
            raise CheckpointError(f"{where}: no saved tensor for trainable parameter {name}")
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in params:
                raise CheckpointError(f"{where}: saved tensor {name} is not a parameter of this model")
            params[name].copy_(t)
