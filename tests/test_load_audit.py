"""Loading checkpoints: what a user of the released Qwen2-Audio folders or of lalm's own saves hits.

Each test here failed before its fix (named in its docstring), except the plain-default row of
the hub cache table, kept as the baseline. Tiny random models only; no transformers.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lalm.api import GenerationDefaults
from lalm.config import ModelConfig
from lalm.errors import CheckpointError, ConfigError
from lalm.hub import hub_cache, resolve_model_path
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.weights import INDEX_FILE, load_checkpoint, save_checkpoint


def tiny_config(**top) -> ModelConfig:
    return ModelConfig.preset("test-tiny", text={"vocab_size": 300}, audio_token_index=299, **top)


# ---------------------------------------------------------------------- hub cache


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No HF variables set, and a home of our own (os.path.expanduser reads $HOME)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.mark.parametrize("env, where", [
    ({}, "home/.cache/huggingface/hub"),
    ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/huggingface/hub"),
    ({"HF_HOME": "~/hfhome"}, "home/hfhome/hub"),
    ({"HF_HOME": "$MYROOT/hf", "MYROOT": "{tmp}/root"}, "root/hf/hub"),
    ({"HUGGINGFACE_HUB_CACHE": "{tmp}/legacy", "HF_HOME": "{tmp}/ignored"}, "legacy"),
    ({"HF_HUB_CACHE": "~/c", "HUGGINGFACE_HUB_CACHE": "{tmp}/legacy"}, "home/c"),
])
def test_hub_cache_is_where_huggingface_hub_downloads(clean_env, tmp_path, env, where):
    """hub.hub_cache read only HF_HUB_CACHE and HF_HOME, unexpanded: with XDG_CACHE_HOME set, the
    older HUGGINGFACE_HUB_CACHE, or HF_HOME=~/x from a .env file, `huggingface-cli download`
    put the model in one folder and `lalm chat --model Qwen/...` looked in another. Expected
    folders follow huggingface_hub/constants.py."""
    for name, value in env.items():
        clean_env.setenv(name, value.format(tmp=tmp_path))
    assert hub_cache() == tmp_path / where


def test_hub_name_found_under_xdg_cache_home(clean_env, tmp_path):
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    repo = tmp_path / "xdg" / "huggingface" / "hub" / "models--Qwen--Qwen2-Audio-7B"
    snapshot = repo / "snapshots" / "cd5e25c"
    snapshot.mkdir(parents=True)
    tiny_config().save(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("cd5e25c")
    assert resolve_model_path("Qwen/Qwen2-Audio-7B") == snapshot


# ---------------------------------------------------------------------- generation_config.json


TOKENIZER = SimpleNamespace(im_end_id=298, endoftext_id=297)  # all GenerationDefaults.load reads


def test_generation_config_nulls_mean_unset(tmp_path):
    """transformers 4.x saved `"temperature": null` (top_p, ...) for a field set to None to quiet
    its do_sample warning, and reads null as unset; lalm.load refused the whole folder with
    "bad value (float() argument must be ... not 'NoneType')"."""
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        "repetition_penalty": None, "length_penalty": None, "num_beams": None,
        "max_new_tokens": None, "eos_token_id": [297, 298], "pad_token_id": 297}))
    d = GenerationDefaults.load(tmp_path, TOKENIZER, tiny_config())
    assert d == GenerationDefaults(eos_token_ids=(297, 298), top_k=0)  # top_k null: no top-k filter
    o = d.options()
    assert o.greedy and o.repetition_penalty == 1.0 and o.stop_token_ids == (297, 298)
    # sampling with the unset fields at transformers' defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": None, "repetition_penalty": None}))
    o = GenerationDefaults.load(tmp_path, TOKENIZER, tiny_config()).options()
    assert (o.temperature, o.top_p, o.top_k, o.repetition_penalty) == (0.7, 1.0, 50, 1.0)


def test_generation_config_null_eos_falls_back_to_the_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    config = ModelConfig.preset("test-tiny", text={"vocab_size": 300, "eos_token_id": 5},
                                audio_token_index=299)
    d = GenerationDefaults.load(tmp_path, TOKENIZER, config)
    assert d.eos_token_ids == (5, 298, 297)


# ---------------------------------------------------------------------- saved dtype


def test_saved_config_names_the_dtype_the_weights_are_in(tmp_path):
    """save_checkpoint copied the config's `torch_dtype`/`dtype` as they were: a model fine-tuned
    in fp32 from the released config (torch_dtype "bfloat16", top level and text_config) was
    written as fp32 tensors beside "bfloat16", so transformers (config first) loaded it in bf16
    while lalm (stored dtype) loaded fp32."""
    config = ModelConfig.preset(
        "test-tiny", text={"vocab_size": 300, "torch_dtype": "bfloat16"}, audio_token_index=299,
        torch_dtype="bfloat16", dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)

    def dtypes(folder):
        d = json.loads((folder / "config.json").read_text())
        text, audio = d["text_config"], d["audio_config"]
        return d["torch_dtype"], d["dtype"], text["torch_dtype"], audio.get("dtype")

    save_checkpoint(model, tmp_path / "fp32")
    assert dtypes(tmp_path / "fp32") == ("float32", "float32", "float32", None)  # no key is added
    again = load_checkpoint(tmp_path / "fp32")
    assert again.language_model.lm_head.weight.dtype == torch.float32
    assert again.config.extra["dtype"] == again.config.text.extra["torch_dtype"] == "float32"
    assert again.config.text.hidden_size == model.config.text.hidden_size
    save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert dtypes(tmp_path / "bf16") == ("bfloat16",) * 3 + (None,)
    assert model.config.extra["torch_dtype"] == "bfloat16"  # the model's own config is untouched


# ---------------------------------------------------------------------- index file


@pytest.mark.parametrize("index", [
    json.dumps({"metadata": {}, "weight_map": ["model-00001-of-00002.safetensors"]}).encode(),
    json.dumps({"weight_map": {"audio_tower.conv1.weight": None}}).encode(),
    b"\xff\xfe{\x00",  # not UTF-8 (a half-written or mis-encoded file)
], ids=["list", "null-shard", "bytes"])
def test_malformed_index_is_named(tmp_path, index):
    """A model.safetensors.index.json that is JSON but not an index, or not text, raised a bare
    AttributeError / TypeError / UnicodeDecodeError (a traceback from `lalm chat`, no file
    named) instead of a CheckpointError."""
    tiny_config().save(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(index)
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: not a safetensors index"):
        load_checkpoint(tmp_path)



# ---------------------------------------------------------------------- quantized exports


def test_quantized_checkpoint_is_refused_by_name(tmp_path):
    """A GPTQ/AWQ/bitsandbytes/FP8 folder's config.json carries quantization_config, which was kept
    as an unknown key; loading then failed on some tensor ("q_proj.weight has shape [2048, 1],
    the config needs [4096, 4096]", or a missing weight beside qweight) as if the config were
    wrong, never saying the weights are quantized."""
    d = tiny_config().to_dict()
    d["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="quantization_config: quantized checkpoints "
                                          "\\(bitsandbytes\\) are not supported"):
        load_checkpoint(tmp_path)


def test_bad_generation_config_fails_before_the_weights_are_read(tmp_path):
    """lalm.load read generation_config.json only after every weight: a typo in it cost the
    minutes a 7B model takes to load before the error came. Here the weights are garbage, so
    reading them first would raise a CheckpointError instead."""
    import lalm
    from lalm.tokenizer import train_bpe

    tiny_config().save(tmp_path)
    train_bpe(["a small corpus of words", "for a tiny tokenizer"] * 4, 262).save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "generation_config.json").write_text('{"do_sample": true,}')
    with pytest.raises(ConfigError, match="generation_config.json: not valid JSON"):
        lalm.load(tmp_path)
