"""Reference side of the parity tests: random tiny Qwen2-Audio checkpoints built and saved by
transformers itself, plus reference-style inputs (expanded <|AUDIO|> ids, WhisperFeatureExtractor
features). Importable from any test (`from hf_reference import build_hf_checkpoint`); transformers
is a test-only dependency.

Token ids here are synthetic (small vocabularies): see `special_ids`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Model shapes the parity tests cover. `text`/`audio` are Qwen2Config / Qwen2AudioEncoderConfig kwargs.
SHAPES: dict[str, dict] = {
    # grouped-query attention: 4 query heads share 2 KV heads
    "gqa": {
        "audio": {
            "d_model": 32,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "encoder_layers": 2,
            "num_mel_bins": 128,
        },
        "text": {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048,
        },
    },
    # plain multi-head attention, as in the released 7B
    "mha": {
        "audio": {
            "d_model": 32,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 48,
            "encoder_layers": 2,
            "num_mel_bins": 128,
        },
        "text": {
            "vocab_size": 400,
            "hidden_size": 48,
            "intermediate_size": 80,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048,
        },
    },
    # odd sizes: hidden 40 = 5 heads x 8, one KV head, encoder 24 = 3 x 8, 80 mel bins, theta 1e6
    "odd": {
        "audio": {
            "d_model": 24,
            "encoder_attention_heads": 3,
            "encoder_ffn_dim": 40,
            "encoder_layers": 3,
            "num_mel_bins": 80,
        },
        "text": {
            "vocab_size": 389,
            "hidden_size": 40,
            "intermediate_size": 72,
            "num_hidden_layers": 3,
            "head_dim": 8,
            "num_attention_heads": 5,
            "num_key_value_heads": 1,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
    },
}


def special_ids(vocab_size: int) -> dict[str, int]:
    """Synthetic ids of the six Qwen2-Audio special tokens at the top of a small vocabulary."""
    names = ["pad", "im_start", "im_end", "audio", "audio_bos", "audio_eos"]
    return {n: vocab_size - len(names) + i for i, n in enumerate(names)}


def hf_config(shape: str):
    from transformers import Qwen2AudioConfig

    spec = SHAPES[shape]
    ids = special_ids(spec["text"]["vocab_size"])
    return Qwen2AudioConfig(
        audio_config=dict(spec["audio"], max_source_positions=1500),
        text_config=dict(spec["text"], model_type="qwen2"),
        audio_token_index=ids["audio"],
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale random weights: transformers' 0.02 init makes every logit ~0, a test that cannot fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_hf_checkpoint(path: str | Path, shape: str = "gqa", seed: int = 0) -> Path:
    """Save a random tiny Qwen2-Audio checkpoint with transformers' own save_pretrained."""
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(hf_config(shape))
    randomize_(model, seed)
    model.save_pretrained(str(path))
    return Path(path)


def load_hf_model(path: str | Path):
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def waveform(seconds: float, seed: int) -> np.ndarray:
    """Noise plus a gliding tone with a fading envelope (so the log-mel floor is exercised)."""
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * 16000))
    t = np.arange(n) / 16000
    tone = np.sin(2 * np.pi * (200 + 300 * rng.random() + 100 * t) * t)
    env = np.exp(-t * rng.uniform(0.1, 1.0))
    return (0.3 * tone * env + 0.05 * rng.standard_normal(n)).astype(np.float32)


def whisper_features(waves: list[np.ndarray], n_mels: int):
    """Reference input_features (n, n_mels, 3000) and feature_attention_mask (n, 3000)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
    )
    out = fe(
        waves,
        sampling_rate=16000,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out["input_features"], out["attention_mask"]


def conv_frames(mel_frames: int) -> int:
    """Mel frames the encoder's convolutions read for its valid outputs: 2 * Lc + 1, at most 3000."""
    return min(2 * ((mel_frames - 1) // 2 + 1) + 1, 3000)


def valid_mel(features: torch.Tensor, feature_mask: torch.Tensor):
    """lalm-style mel from reference features: valid frames + the frames the convolutions see,
    right-padded with zeros (which the model must never read), and the valid frame counts."""
    frames = feature_mask.sum(-1)
    need = [conv_frames(int(n)) for n in frames]
    mel = torch.zeros(features.shape[0], features.shape[1], max(need))
    for i, n in enumerate(need):
        mel[i, :, :n] = features[i, :, :n]
    return mel, frames


def n_audio_tokens(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def conversation_ids(
    turns: list[list],
    audio_tokens: list[int],
    vocab_size: int,
    seed: int,
    generation_prompt: bool = True,
) -> list[int]:
    """Processor-style ids for a conversation with synthetic text tokens.

    turns: alternating user/assistant turns, each a list of parts: an int n (n random text
    tokens) or "audio" (`Audio k: <|audio_bos|><|AUDIO|> x N_k <|audio_eos|>\\n`, k counted over
    the conversation, as the Instruct template renders it).
    """
    rng = np.random.default_rng(seed)
    s = special_ids(vocab_size)

    def text(n):
        return rng.integers(0, s["pad"], n).tolist()

    ids = [s["im_start"], *text(3), s["im_end"], 7]  # system prompt
    k = 0
    for i, turn in enumerate(turns):
        ids += [s["im_start"], 11 + i % 2, 7]  # role, "\n"
        for part in turn:
            if part == "audio":
                ids += (
                    text(4)
                    + [s["audio_bos"]]
                    + [s["audio"]] * audio_tokens[k]
                    + [s["audio_eos"], 7]
                )
                k += 1
            else:
                ids += text(part)
        ids += [s["im_end"], 7]
    if generation_prompt:
        ids += [s["im_start"], 12, 7]
    assert k == len(audio_tokens), "one audio length per audio part"
    return ids


def left_pad(seqs: list[list[int]], pad_id: int):
    """input_ids, attention_mask (bool) and position_ids = cumsum(mask) - 1 (0 on pads)."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos
