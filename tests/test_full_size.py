"""The `qwen2-audio-7b` preset, built on the meta device (no memory), has the released
checkpoint's tensor names, shapes and parameter count (spec section 2)."""

from __future__ import annotations

import torch

from lalm.config import ModelConfig
from lalm.model import Qwen2AudioForConditionalGeneration


def test_full_size_names_shapes_and_count():
    config = ModelConfig.preset("qwen2-audio-7b")
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    state = model.state_dict()
    assert len(state) == 876
    counts = {
        p: sum(k.startswith(p) for k in state)
        for p in ("audio_tower.", "multi_modal_projector.", "language_model.")
    }
    assert counts == {"audio_tower.": 487, "multi_modal_projector.": 2, "language_model.": 387}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "audio_tower.conv1.weight": (1280, 128, 3),
        "audio_tower.conv2.weight": (1280, 1280, 3),
        "audio_tower.embed_positions.weight": (1500, 1280),
        "audio_tower.layers.31.self_attn.q_proj.bias": (1280,),
        "audio_tower.layers.0.fc1.weight": (5120, 1280),
        "audio_tower.layer_norm.weight": (1280,),
        "multi_modal_projector.linear.weight": (4096, 1280),
        "multi_modal_projector.linear.bias": (4096,),
        "language_model.model.embed_tokens.weight": (156032, 4096),
        "language_model.model.layers.31.self_attn.k_proj.weight": (4096, 4096),
        "language_model.model.layers.0.self_attn.v_proj.bias": (4096,),
        "language_model.model.layers.0.mlp.gate_proj.weight": (11008, 4096),
        "language_model.model.layers.0.mlp.down_proj.weight": (4096, 11008),
        "language_model.model.norm.weight": (4096,),
        "language_model.lm_head.weight": (156032, 4096),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    # Whisper: no key bias; Qwen2: bias on q/k/v only.
    assert "audio_tower.layers.0.self_attn.k_proj.bias" not in state
    assert "language_model.model.layers.0.self_attn.o_proj.bias" not in state
    assert not any(
        k.startswith("language_model.model.layers.0.mlp.") and k.endswith("bias") for k in state
    )
    n = sum(p.numel() for p in model.parameters())
    assert n == config.num_parameters()
    assert 8.39e9 < n < 8.41e9  # ~8.40 B by shape (LM 7.755 B, encoder 0.637 B, projector 5.2 M)
    lm = sum(v.numel() for k, v in state.items() if k.startswith("language_model."))
    enc = sum(v.numel() for k, v in state.items() if k.startswith("audio_tower."))
    assert round(lm / 1e9, 3) == 7.755 and round(enc / 1e9, 3) == 0.637
    assert config.text.num_key_value_heads == 32 and config.text.head_dim == 128
    assert not config.text.tie_word_embeddings
