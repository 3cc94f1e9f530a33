"""config.json in and out: round trips, both RoPE spellings, transformers' defaults, error policy."""

from __future__ import annotations

import json

import pytest

from lalm.config import PRESETS, AudioConfig, ModelConfig, TextConfig
from lalm.errors import ConfigError

# The released Qwen/Qwen2-Audio-7B-Instruct config.json as the spec gives it (sections 2 and 3).
RELEASED = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "d_model": 1280,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "activation_function": "gelu",
        "max_source_positions": 1500,
        "scale_embedding": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
    },
    "audio_token_index": 151646,
    "ignore_index": -100,
    "model_type": "qwen2_audio",
    "text_config": {
        "model_type": "qwen2",
        "vocab_size": 156032,
        "intermediate_size": 11008,
        "max_position_embeddings": 8192,
        "rope_theta": 10000,
        "rms_norm_eps": 1e-05,
        "sliding_window": 32768,
        "use_mrope": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "vocab_size": 156032,
}


def test_released_config_reads_as_the_7b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    config = ModelConfig.load(tmp_path)
    preset = ModelConfig.preset("qwen2-audio-7b")
    for c in (config, preset):
        assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_attention_heads) == (
            4096,
            32,
            32,
        )
        assert (c.text.num_key_value_heads, c.text.head_dim, c.text.hidden_act) == (32, 128, "silu")
        assert c.text.tie_word_embeddings is False and c.text.rope_theta == 10000.0
        assert (c.text.vocab_size, c.text.intermediate_size, c.text.rms_norm_eps) == (
            156032,
            11008,
            1e-5,
        )
        assert c.audio.d_model == 1280 and c.audio_token_index == 151646
    assert config.audio == preset.audio
    assert {k: v for k, v in vars(config.text).items() if k != "extra"} == {
        k: v for k, v in vars(preset.text).items() if k != "extra"
    }
    # keys we do not model survive a save
    config.save(tmp_path / "out")
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        again["text_config"]["use_mrope"] is False
        and again["text_config"]["sliding_window"] == 32768
    )
    assert again["transformers_version"] == "4.38.1" and again["vocab_size"] == 156032


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name, tmp_path):
    config = ModelConfig.preset(name)
    config.save(tmp_path)
    assert ModelConfig.load(tmp_path) == config
    assert ModelConfig.load(tmp_path / "config.json") == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_rope_parameters_form():
    new = TextConfig.from_dict(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    )
    old = TextConfig.from_dict({"rope_theta": 1e6})
    assert new.rope_theta == old.rope_theta == 1e6
    assert new.to_dict()["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert (
        new.to_dict()["rope_theta"] == 1e6
    )  # both spellings written, for transformers 4.x and 5.x
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):
        TextConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="rope_theta"):
        TextConfig.from_dict(
            {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
        )
    with pytest.raises(ConfigError, match="rope_scaling"):
        TextConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})


def test_defaults_equal_transformers():
    transformers = pytest.importorskip("transformers")
    ours = ModelConfig.from_dict({"model_type": "qwen2_audio"})
    theirs = transformers.Qwen2AudioConfig()
    t, a = theirs.text_config, theirs.audio_config
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "use_sliding_window",
    ):
        assert getattr(ours.text, name) == getattr(t, name), name
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    for name in (
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "encoder_attention_heads",
        "encoder_ffn_dim",
        "max_source_positions",
        "activation_function",
        "scale_embedding",
    ):
        assert getattr(ours.audio, name) == getattr(a, name), name
    assert ours.audio_token_index == theirs.audio_token_index == 151646


def test_our_config_reads_the_same_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.preset("test-tiny", text={"rope_theta": 5e5, "head_dim": 16})
    config.save(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert theirs.model_type == "qwen2_audio"
    t = theirs.text_config
    assert (t.hidden_size, t.num_key_value_heads, t.head_dim, t.vocab_size) == (32, 2, 16, 151936)
    assert t.rope_parameters["rope_theta"] == 5e5
    assert theirs.audio_config.d_model == 32 and theirs.audio_token_index == 151646


def test_omitted_kv_heads_mean_mha_and_head_dim_derives():
    t = TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 8})
    assert t.num_key_value_heads == 8 and t.head_dim == 8
    assert TextConfig.from_dict({"num_key_value_heads": None}).num_key_value_heads == 32


@pytest.mark.parametrize(
    "d, field",
    [
        ({"text_config": {"hidden_size": "4096"}}, "text_config.hidden_size"),
        (
            {"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}},
            "text_config.num_key_value_heads",
        ),
        ({"text_config": {"hidden_act": "gelu"}}, "text_config.hidden_act"),
        ({"text_config": {"use_sliding_window": True}}, "text_config.use_sliding_window"),
        ({"text_config": {"tie_word_embeddings": "no"}}, "text_config.tie_word_embeddings"),
        ({"text_config": {"vocab_size": 0}}, "text_config.vocab_size"),
        ({"text_config": {"model_type": "llama"}}, "text_config.model_type"),
        ({"text_config": [1, 2]}, "text_config"),
        ({"audio_config": {"d_model": 1280, "encoder_attention_heads": 7}}, "audio_config.d_model"),
        ({"audio_config": {"activation_function": "relu"}}, "audio_config.activation_function"),
        ({"audio_config": {"encoder_layers": 2.5}}, "audio_config.encoder_layers"),
        ({"audio_token_index": "151646"}, "audio_token_index"),
        ({"audio_token_index": 10**6}, "audio_token_index"),
        ({"model_type": "whisper"}, "model_type"),
    ],
)
def test_malformed_values_name_the_field(d, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(d)


def test_unknown_keys_are_kept_not_rejected():
    d = {
        "model_type": "qwen2_audio",
        "some_future_key": [1, 2],
        "text_config": {"layer_types": ["full_attention"] * 32, "max_window_layers": 28},
        "audio_config": {"initializer_range": 0.02, "brand_new": True},
    }
    config = ModelConfig.from_dict(d)
    out = config.to_dict()
    assert out["some_future_key"] == [1, 2]
    assert (
        out["text_config"]["max_window_layers"] == 28 and out["audio_config"]["brand_new"] is True
    )


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": -1}}))
    with pytest.raises(ConfigError, match="config.json: .*text_config.hidden_size"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'.*qwen2-audio-7b"):
        ModelConfig.preset("huge")


def test_preset_overrides_and_param_count():
    tiny = ModelConfig.preset("test-tiny", text={"num_hidden_layers": 3}, audio_token_index=7)
    assert tiny.text.num_hidden_layers == 3 and tiny.audio_token_index == 7
    assert PRESETS["test-tiny"].text.num_hidden_layers == 2  # the table itself is untouched
    assert isinstance(tiny.audio, AudioConfig)
    assert 8.39e9 < ModelConfig.preset("qwen2-audio-7b").num_parameters() < 8.41e9
