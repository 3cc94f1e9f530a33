"""Checkpoint folders: strict loading with errors that name the tensor, sharded round trips,
and folders saved by lalm that transformers loads to the same logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lalm.config import ModelConfig
from lalm.errors import CheckpointError, ConfigError
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.weights import INDEX_FILE, load_checkpoint, save_checkpoint


def read_all(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a mapping)


def copy_with(src, dst, change):
    """A copy of checkpoint folder `src` whose tensors went through `change(dict)`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = read_all(src)
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_loads_transformers_checkpoint_exactly(hf_checkpoint):
    folder = hf_checkpoint("gqa")
    model = load_checkpoint(folder)
    stored = read_all(folder)
    state = model.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    assert not any(p.is_meta for p in model.parameters())
    assert not model.audio_tower.embed_positions.weight.requires_grad


@pytest.mark.parametrize("prefixes", [
    # transformers 5's in-memory names
    {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
     "audio_tower.": "model.audio_tower.", "multi_modal_projector.": "model.multi_modal_projector."},
    # what transformers 5.17's save_pretrained writes (seen on a GPU machine's image)
    {"language_model.model.": "language_model.model.model."},
], ids=["in-memory", "5.17-saved"])
def test_loads_transformers_5_layouts(hf_checkpoint, tmp_path, prefixes):
    """The same tensors under transformers 5's other names load under their released names."""
    src = hf_checkpoint("gqa")

    def rename(t):
        for k in list(t):
            old = next((p for p in prefixes if k.startswith(p)), None)
            if old:
                t[prefixes[old] + k[len(old):]] = t.pop(k)

    folder = copy_with(src, tmp_path / "v5", rename)
    assert "language_model.model.norm.weight" not in read_all(folder)
    state, stored = load_checkpoint(folder).state_dict(), read_all(src)
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)

    def both(t):  # one tensor under both names is refused, not silently picked
        t["model.language_model.norm.weight"] = t["language_model.model.norm.weight"].clone()

    with pytest.raises(CheckpointError, match="stored under two names"):
        load_checkpoint(copy_with(src, tmp_path / "both", both))


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    name = "language_model.model.layers.1.self_attn.k_proj.bias"
    folder = copy_with(hf_checkpoint("gqa"), tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {name} \\(expected shape \\[32\\]\\)$"):
        load_checkpoint(folder)


def test_other_layout_is_named_in_the_error(hf_checkpoint, tmp_path):
    """A folder whose names follow some other layout: the error shows one of its names."""

    def rename(t):
        for k in list(t):
            t["net." + k] = t.pop(k)

    folder = copy_with(hf_checkpoint("gqa"), tmp_path / "ck", rename)
    with pytest.raises(CheckpointError, match="missing tensor .*; the folder holds net\\..*, which this model"):
        load_checkpoint(folder)


def test_misshapen_tensor_is_named(hf_checkpoint, tmp_path):
    name = "audio_tower.layers.0.fc1.weight"

    def change(t):
        t[name] = t[name][:-1].clone()

    folder = copy_with(hf_checkpoint("gqa"), tmp_path / "ck", change)
    with pytest.raises(
        CheckpointError, match=f"tensor {name} has shape \\[63, 32\\].*needs \\[64, 32\\]"
    ):
        load_checkpoint(folder)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    name = "audio_tower.layers.0.self_attn.k_proj.bias"  # Whisper's key projection has no bias

    def change(t):
        t[name] = torch.zeros(32)

    folder = copy_with(hf_checkpoint("gqa"), tmp_path / "ck", change)
    with pytest.raises(CheckpointError, match=f"unexpected tensor {name}"):
        load_checkpoint(folder)


def test_bad_folders(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "pickled").mkdir()
    shutil.copy(hf_checkpoint("gqa") / "config.json", tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_checkpoint(tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "pickled")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(tmp_path / "noconfig")


def test_dtype_and_device(hf_checkpoint):
    model = load_checkpoint(hf_checkpoint("gqa"), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(ids).dtype == torch.bfloat16


def test_sharded_round_trip(lalm_model, tmp_path):
    model = lalm_model("odd")
    save_checkpoint(model, tmp_path, max_shard_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 4 for t in model.state_dict().values()
    )
    again = load_checkpoint(tmp_path)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saving again unsharded leaves no stale shards behind
    save_checkpoint(again, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_saved_checkpoint_loads_in_transformers(lalm_model, tmp_path, sharded):
    pytest.importorskip("transformers")
    from hf_reference import load_hf_model

    model = lalm_model("gqa")
    save_checkpoint(model, tmp_path, max_shard_bytes=200_000 if sharded else 10**10)
    assert (tmp_path / INDEX_FILE).exists() == sharded
    hf = load_hf_model(tmp_path)
    ids = torch.tensor([[3, 9, 27, 81, 243, 100, 4]])
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits, model(ids)
    assert ref.abs().max() > 0.5
    assert (ref - out).abs().max().item() <= 1e-4


def test_tied_embeddings_save_load_and_transformers(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import load_hf_model, randomize_

    config = ModelConfig.preset(
        "test-tiny", text={"vocab_size": 300, "tie_word_embeddings": True}, audio_token_index=299
    )
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    randomize_(model, 0)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    save_checkpoint(model, tmp_path)
    stored = read_all(tmp_path)  # the head is written out (transformers does not re-tie it)
    assert torch.equal(
        stored["language_model.lm_head.weight"], stored["language_model.model.embed_tokens.weight"]
    )
    again = load_checkpoint(tmp_path)
    assert again.language_model.lm_head.weight is again.language_model.model.embed_tokens.weight
    headless = load_checkpoint(
        copy_with(tmp_path, tmp_path / "headless", lambda t: t.pop("language_model.lm_head.weight"))
    )
    assert (
        headless.language_model.lm_head.weight is headless.language_model.model.embed_tokens.weight
    )
    embedless = load_checkpoint(copy_with(tmp_path, tmp_path / "embedless",
                                          lambda t: t.pop("language_model.model.embed_tokens.weight")))
    assert embedless.language_model.lm_head.weight is embedless.language_model.model.embed_tokens.weight
    assert torch.equal(embedless.language_model.lm_head.weight, model.language_model.lm_head.weight)
    with pytest.raises(CheckpointError, match="missing tensor language_model.model.embed_tokens.weight"):
        load_checkpoint(copy_with(tmp_path, tmp_path / "neither", lambda t: [
            t.pop("language_model.model.embed_tokens.weight"), t.pop("language_model.lm_head.weight")]))
    ids = torch.tensor([[1, 5, 7, 200, 42]])
    hf = load_hf_model(tmp_path)
    with torch.no_grad():
        ref, out, out2 = hf(input_ids=ids).logits, model(ids), again(ids)
    assert torch.equal(out, out2)
    assert (ref - out).abs().max().item() <= 1e-4
