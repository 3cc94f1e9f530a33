"""Hugging Face checkpoint folders in and out: safetensors only, strict, no unpickling.

A folder holds `config.json` and either `model.safetensors` or shards
`model-0000k-of-0000n.safetensors` listed in `model.safetensors.index.json`. Tensor names are
the released checkpoint's (spec section 2), which are our module names, so loading is a
one-to-one check: every tensor used, every shape right, or a CheckpointError naming the first
that is not.

transformers 5 holds Qwen2-Audio as `model.language_model.*`, `model.audio_tower.*`,
`model.multi_modal_projector.*` and `lm_head.*` and renames to the released names when it saves,
not always right: 5.24 writes the released names, 5.17 writes the decoder as
`language_model.model.model.*` (seen on a GPU machine). Each such layout is read, renamed by
`released_name`.

Loading builds the model on the meta device (no memory, no random init) and then assigns the
checkpoint's tensors in place one at a time, so a 7B model in bf16 needs its size in RAM once,
not twice.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lalm.config import ModelConfig
from lalm.errors import CheckpointError
from lalm.model import Qwen2AudioForConditionalGeneration

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")
TIED_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"


# transformers 5's in-memory prefixes -> the released checkpoint's (its conversion_mapping.py,
# "qwen2_audio", read backwards), and 5.17's doubled "model.". No released name starts with
# "model." or "lm_head." or holds "model.model.".
_V5_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.audio_tower.", "audio_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                ("language_model.model.model.", "language_model.model."))


def released_name(name: str) -> str:
    """The released checkpoint's name for a tensor stored under either layout."""
    for new, old in _V5_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map each tensor name of a checkpoint folder to the safetensors file that holds it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index}: not a safetensors index (its weight_map must map tensor names to "
                "shard files)"
            )
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise CheckpointError(
                    f"{index}: lists shard {file.name}, which is not in the folder"
                )
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}; pickled weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)  # safe_open is not a mapping


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _stored_shapes(files: dict[str, Path]) -> tuple[dict[str, tuple], torch.dtype | None]:
    """Shapes of every tensor (header reads only) and the dtype of the first floating tensor."""
    shapes, dtype = {}, None
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(
                        f"{file}: the index says it holds tensor {name}, but it does not"
                    )
                sl = f.get_slice(name)
                if released_name(name) in shapes:
                    raise CheckpointError(f"{file}: tensor {name} is stored under two names")
                shapes[released_name(name)] = tuple(sl.get_shape())
                if dtype is None:
                    dtype = _DTYPES.get(sl.get_dtype())
    return shapes, dtype


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_tensors(
    expected: dict[str, tuple], stored: dict[str, tuple], where: Path, optional=()
) -> None:
    """Raise CheckpointError naming the first missing, misshapen or unexpected tensor."""
    unexpected = [name for name in stored if name not in expected]
    for name, shape in expected.items():
        if name not in stored:
            if name in optional:
                continue
            # A folder in another layout misses everything: show one of its own names.
            also = f"; the folder holds {unexpected[0]}, which this model does not expect" if unexpected else ""
            raise CheckpointError(f"{where}: missing tensor {name} (expected shape {list(shape)}){also}")
        if tuple(stored[name]) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(stored[name])}, "
                f"the config needs {list(shape)}"
            )
    for name in unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor {name} (shape {list(stored[name])}); "
            f"it is not part of this model"
        )


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Qwen2AudioForConditionalGeneration:
    """Build the model from `path`/config.json and load its safetensors strictly.

    dtype: None keeps the stored floating dtype (bf16 for the released checkpoints).
    device: where the tensors go (default CPU); each tensor is moved as it is read.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = ModelConfig.load(path)
    files = checkpoint_files(path)
    stored, stored_dtype = _stored_shapes(files)
    dtype = dtype or stored_dtype or torch.float32
    device = torch.device(device or "cpu")

    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = config.text.tie_word_embeddings
    # Tied: either name may hold the one matrix (transformers keeps one of the two when it saves).
    check_tensors(expected, stored, path, optional=(TIED_HEAD, EMBED) if tied else ())
    if tied and EMBED not in stored and TIED_HEAD not in stored:
        raise CheckpointError(f"{path}: missing tensor {EMBED} (the tied embedding and head)")

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for stored_name in names:
                name = released_name(stored_name)
                if tied and name == TIED_HEAD and EMBED in stored:
                    continue  # the head is the embedding; the embedding tensor wins, as in transformers
                t = f.get_tensor(stored_name)
                state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    if tied:
        state[EMBED] = state.get(EMBED, state.get(TIED_HEAD))
        state[TIED_HEAD] = state[EMBED]
    # assign=True puts the loaded tensors in place of the meta ones (no second copy).
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign replaced the shared Parameter by two; share again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.audio_tower.embed_positions.requires_grad_(False)
    return model.eval()


def _first_float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    return next((t.dtype for t in state.values() if t.is_floating_point()), None)


def _config_naming_dtype(config: ModelConfig, dtype: torch.dtype | None) -> ModelConfig:
    """`config` with the `torch_dtype`/`dtype` keys it carries set to the dtype the weights are
    written in. A model fine-tuned in fp32 from the released config would otherwise say
    "bfloat16" beside fp32 tensors, and transformers, which takes the config's word over the
    weights', would load it in another precision than lalm does."""
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    name = names.get(dtype)
    if name is None:
        return config

    # Only keys already there: without one, transformers takes the dtype from the weights.
    def named(extra: dict) -> dict:
        return {k: name if k in ("torch_dtype", "dtype") else v for k, v in extra.items()}

    return replace(
        config,
        extra=named(config.extra),
        text=replace(config.text, extra=named(config.text.extra)),
        audio=replace(config.audio, extra=named(config.audio.extra)),
    )


def save_checkpoint(
    model: Qwen2AudioForConditionalGeneration,
    path: str | Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json and the weights in the released layout (sharded above max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    _config_naming_dtype(model.config, dtype or _first_float_dtype(state)).save(path)
    if model.config.text.tie_word_embeddings:
        # safetensors stores no aliases, and transformers' Qwen2Audio never re-ties a head: write
        # the head as its own copy so every loader gets the same logits.
        state[TIED_HEAD] = state[TIED_HEAD].clone()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * (
            dtype.itemsize if dtype and t.is_floating_point() else t.element_size()
        )
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a stale shard from an earlier save would be read as ours
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = (
            SINGLE_FILE
            if len(shards) == 1
            else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {}
        for name in names:
            t = state[name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t.to("cpu").contiguous()
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path
