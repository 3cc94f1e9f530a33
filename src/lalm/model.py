"""Qwen2-Audio in plain PyTorch: Whisper-style audio encoder, linear projector, Qwen2 decoder.

Module names equal the Hugging Face checkpoint keys (`audio_tower.*`, `multi_modal_projector.linear.*`,
`language_model.model.*`, `language_model.lm_head.*`), so `weights.py` maps tensors one to one.

Shapes: B batch, T new tokens, S keys (cache length so far), H query heads, Hkv key/value heads,
D head dim, A audio windows, F mel frames (batch max), F2 = (F - 1) // 2 + 1 encoder positions.

The encoder runs on the valid mel frames only (the reference pads every clip to 30 s = 3000 frames).
Each output vector the model keeps depends only on valid positions: keys past a window's
Lc = (L_mel - 1) // 2 + 1 are masked, queries past Lc are never kept, and the convolutions see the
one or two floor-valued frames past L_mel that the front-end supplies (audio.log_mel). So a 3 s clip
costs ~300 frames instead of 3000 and gives the reference's numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lalm import kernels
from lalm.config import AudioConfig, ModelConfig, TextConfig
from lalm.decode_ops import decode_gemm, decode_linear, fused_bias, fused_weight, use_decode_layout
from lalm.errors import AudioError, ChatFormatError

MAX_MEL_FRAMES = 3000  # 30 s at 100 frames/s: the encoder's position table covers no more


def num_audio_tokens(mel_frames: torch.Tensor) -> torch.Tensor:
    """Audio tokens per window from its valid mel frames L_mel (spec section 2)."""
    conv_len = (mel_frames - 1) // 2 + 1  # Lc: after conv2 (stride 2)
    return (conv_len - 2) // 2 + 1  # after AvgPool1d(2, 2); == Lc // 2


def checkpointed(layer: nn.Module, enabled: bool):
    """`layer` itself, or a wrapper that recomputes its activations in backward when training."""
    if not (enabled and layer.training and torch.is_grad_enabled()):
        return layer
    return lambda *args: torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)


# ---------------------------------------------------------------- audio encoder


class EncoderAttention(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.encoder_attention_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.d_model)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)  # Whisper: no key bias
        self.v_proj = nn.Linear(c.d_model, c.d_model)
        self.out_proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # x (A, F2, d); key_mask (A, 1, 1, F2) bool, True = attend, or None when nothing is padded
        A, S, d = x.shape
        q, k, v = (
            p(x).view(A, S, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        # SDPA's default scale is head_dim ** -0.5, the reference's q scaling.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (A, heads, F2, hd)
        return self.out_proj(out.transpose(1, 2).reshape(A, S, d))


class EncoderLayer(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.self_attn = EncoderAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.encoder_ffn_dim)
        self.fc2 = nn.Linear(c.encoder_ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)  # pre-LN
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # exact-erf GELU
        if x.dtype == torch.float16:  # the reference clamps fp16 overflow the same way
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    """Whisper-large-v3 encoder with Qwen2-Audio's AvgPool1d(2, 2) *before* the final LayerNorm."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
        # A checkpoint tensor (Whisper's sinusoids), loaded rather than recomputed, never trained.
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)
        self.gradient_checkpointing = False

    def forward(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
        """mel (A, n_mels, F) right-padded, mel_frames (A,) valid frames -> (A, F2 // 2, d).

        Rows past each window's num_audio_tokens are padding and must be dropped by the caller.
        """
        n_frames = mel.shape[2]
        if n_frames > 2 * self.embed_positions.num_embeddings:
            raise AudioError(
                f"mel has {n_frames} frames; the encoder takes at most "
                f"{2 * self.embed_positions.num_embeddings} (30 s): split long audio into windows"
            )
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (A, F2, d)
        x = x + self.embed_positions.weight[: x.shape[1]]
        conv_len = (mel_frames.to(x.device) - 1) // 2 + 1  # (A,) valid encoder positions Lc
        positions = torch.arange(x.shape[1], device=x.device)
        key_mask = None
        if bool((conv_len < x.shape[1]).any()):
            key_mask = (positions[None, :] < conv_len[:, None])[:, None, None, :]  # (A, 1, 1, F2)
        for layer in self.layers:
            x = checkpointed(layer, self.gradient_checkpointing)(x, key_mask)
        x = F.avg_pool1d(x.transpose(1, 2), kernel_size=2, stride=2).transpose(
            1, 2
        )  # (A, F2//2, d)
        return self.layer_norm(x)


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear = nn.Linear(config.audio.d_model, config.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # no activation


# ---------------------------------------------------------------- Qwen2 decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the reference's order of roundings.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel (bit-identical, fewer ops); in
        # fp32 the scale goes inside it too (the same products in the same order: one op less,
        # 49 per step of a 24-layer decoder).
        if x.dtype == torch.float32 == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, 1, T, D), computed in fp32 then cast (as the reference).

    Computed per call rather than cached in a buffer: it is (B, T, D) work, and a model built
    on the meta device then has no buffers to re-initialise.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values (layers, B, Hkv, S_max, D), written in place at `cache_pos`.

    No per-step concatenation: a decode step writes one slot per layer and attends over the
    first S slots, S being the length of the key mask the caller passes (gpt-fast style).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(
        cls, model: Qwen2AudioForConditionalGeneration, batch: int, max_len: int
    ) -> KVCache:
        t, p = model.config.text, model.language_model.lm_head.weight
        return cls(
            t.num_hidden_layers,
            batch,
            t.num_key_value_heads,
            max_len,
            t.head_dim,
            p.dtype,
            p.device,
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nn.Linear(
            c.hidden_size, c.num_attention_heads * c.head_dim
        )  # q/k/v have bias,
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
        self.o_proj = nn.Linear(
            c.num_attention_heads * c.head_dim, c.hidden_size, bias=False
        )  # o does not
        # Decode-kernel copies of q|k|v and o (`use_decode_layout`); not parameters, not saved.
        self.qkv_panels: kernels.Panels | None = None
        self.o_panels: kernels.Panels | None = None

    def forward(
        self, x, cos, sin, mask, kv: tuple | None, cache_pos, n_keys: int, q_from: int = 0
    ) -> torch.Tensor:
        # x (B, T, hidden); mask (B, 1, T - q_from, S) bool or None (then causal over T == S keys,
        # or a single query that sees every key). Keys/values come from all T rows, queries only
        # from rows q_from.. (the output is (B, T - q_from, hidden)).
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if q_from:
            Tq = T - q_from
            q = self.q_proj(x[:, q_from:]).view(B, Tq, H, D).transpose(1, 2)  # (B, H, Tq, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            q, k = apply_rope(q, cos[:, :, q_from:], sin[:, :, q_from:]), apply_rope(k, cos, sin)
            T = Tq
        elif T == 1 and (w := fused_weight(projections)) is not None:
            # One GEMM for q|k|v, one RoPE for q|k: a decode step is op-bound beside its weight
            # reads.
            qkv = decode_gemm(x.reshape(B, -1), w, self.qkv_panels)  # (B, (H + 2 Hkv) D), a new tensor
            qkv += fused_bias(projections)
            qk = apply_rope(qkv[:, : (H + Hkv) * D].view(B, H + Hkv, 1, D), cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * D:].view(B, Hkv, 1, D)
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_cache, v_cache = kv  # (B, Hkv, S_max, D) views into KVCache
            k_cache.index_copy_(2, cache_pos, k)
            v_cache.index_copy_(2, cache_pos, v)
            k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
        groups = self.num_heads // self.num_kv_heads
        if T == 1 and groups > 1:
            # Decode: the `groups` query heads sharing a KV head become that head's query rows,
            # (B, H, 1, D) -> (B, Hkv, groups, D), so K/V are read in place instead of expanded
            # (each query row's softmax is computed on its own either way); mask (B, 1, 1, S)
            # broadcasts over the rows.
            out = F.scaled_dot_product_attention(
                q.reshape(B, self.num_kv_heads, groups, self.head_dim), k, v, attn_mask=mask
            )  # (B, Hkv, groups, D)
            return decode_linear(self.o_proj, out.reshape(B, 1, -1), self.o_panels)
        if groups > 1 and mask is not None:
            # Fused GQA kernels take no arbitrary mask; expand K/V as transformers' repeat_kv does.
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=k.shape[1] != q.shape[1],
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return decode_linear(self.o_proj, out, self.o_panels) if T == 1 else self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.gate_up_panels: kernels.Panels | None = None  # decode-kernel copies (`use_decode_layout`)
        self.down_panels: kernels.Panels | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, T, hidden)
        if x.shape[1] == 1 and (w := fused_weight((self.gate_proj, self.up_proj))) is not None:
            gate, up = decode_gemm(x.reshape(x.shape[0], -1), w, self.gate_up_panels).view(*x.shape[:-1], -1).chunk(2, -1)
            return decode_linear(self.down_proj, F.silu(gate) * up, self.down_panels)  # SwiGLU
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv, cache_pos, n_keys, q_from: int = 0) -> torch.Tensor:
        # q_from > 0: only rows q_from.. go on past the keys/values (see `hidden_states`)
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_pos, n_keys, q_from)
        x = x[:, q_from:] + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.model = Qwen2Model(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.head_panels: kernels.Panels | None = None  # decode-kernel copy (`use_decode_layout`)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def attention_mask_4d(attention_mask: torch.Tensor | None, cache_pos: torch.Tensor, n_keys: int):
    """Boolean (B, 1, T, S) mask, True = attend, or None when plain causal attention is exact.

    attention_mask (B, S) marks real keys (left padding is False). Query t sits at cache slot
    cache_pos[t] and sees keys s <= cache_pos[t]. Every query also sees itself, so a padding
    query has one key and gives finite (ignored) values instead of NaN.
    """
    T = cache_pos.shape[0]
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and T == n_keys:
        return None  # prefill from slot 0: SDPA's is_causal
    if no_padding and T == 1 and int(cache_pos[0]) == n_keys - 1:
        return None  # one decode query at the last slot sees every key: no mask at all
    keys = torch.arange(n_keys, device=cache_pos.device)
    causal = keys[None, :] <= cache_pos[:, None]  # (T, S)
    if no_padding:
        return causal[None, None]
    own = keys[None, :] == cache_pos[:, None]
    return ((causal[None] & attention_mask[:, None, :].bool()) | own[None])[:, None]  # (B, 1, T, S)


# ---------------------------------------------------------------- the whole model


class Qwen2AudioForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.audio_tower = AudioEncoder(config.audio)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = Qwen2ForCausalLM(config.text)
        # Training memory: recompute each decoder layer's activations in the backward pass.
        # (`audio_tower.gradient_checkpointing` does the same for the encoder.)
        self.gradient_checkpointing = False

    def use_decode_layout(self) -> None:
        """Lay the decoder's weights out for fast CPU decode steps (values unchanged; idempotent):
        `decode_ops.use_decode_layout`."""
        use_decode_layout(self)

    def encode_audio(self, mel: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
        """mel (A, n_mels, F), mel_frames (A,) -> (sum N_i, hidden): window i's N_i vectors, in order."""
        if mel.dim() != 3 or mel.shape[1] != self.config.audio.num_mel_bins:
            raise AudioError(
                f"mel must be (windows, {self.config.audio.num_mel_bins}, frames), "
                f"got {tuple(mel.shape)}"
            )
        mel_frames = mel_frames.to(mel.device)
        if (
            mel_frames.shape != (mel.shape[0],)
            or bool((mel_frames < 1).any())
            or bool((mel_frames > mel.shape[2]).any())
        ):
            raise AudioError(
                f"mel_frames {mel_frames.tolist()} must give 1..{mel.shape[2]} valid frames "
                f"for each of the {mel.shape[0]} mel windows"
            )
        x = self.audio_tower(mel, mel_frames)  # (A, P, d)
        n_tokens = num_audio_tokens(mel_frames)  # (A,)
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < n_tokens[:, None]  # (A, P)
        return self.multi_modal_projector(x[keep])  # project only the kept rows

    def embed(self, input_ids, mel=None, mel_frames=None, audio_rows=None) -> torch.Tensor:
        """Token embeddings (B, T, hidden) with audio vectors at the <|AUDIO|> positions.

        audio_rows (sum N, d_audio): the frozen encoder's kept output rows (cached), given instead
        of mel; only the projector runs on them.
        """
        x = self.language_model.model.embed_tokens(input_ids)
        is_audio = input_ids == self.config.audio_token_index
        if audio_rows is not None:
            if mel is not None:
                raise ValueError("pass mel or audio_rows, not both")
            w = self.multi_modal_projector.linear.weight
            feats = self.multi_modal_projector(audio_rows.to(w.device, w.dtype))
            if int(is_audio.sum()) != feats.shape[0]:
                raise ChatFormatError(
                    f"audio features and <|AUDIO|> tokens do not match: {feats.shape[0]} "
                    f"cached encoder rows, {int(is_audio.sum())} tokens"
                )
            x[is_audio] = feats.to(x.dtype)
            return x
        if mel is None:
            if bool(is_audio.any()):
                raise ChatFormatError(
                    f"input has {int(is_audio.sum())} <|AUDIO|> tokens but no audio"
                )
            return x
        feats = self.encode_audio(mel, mel_frames)
        n_tokens = int(is_audio.sum())
        if n_tokens != feats.shape[0]:
            raise ChatFormatError(
                f"audio features and <|AUDIO|> tokens do not match: {feats.shape[0]} "
                f"feature vectors from {mel.shape[0]} windows, {n_tokens} tokens"
            )
        x[is_audio] = feats.to(x.dtype)  # x is a fresh tensor from the embedding: safe in place
        return x

    def hidden_states(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        mel=None,
        mel_frames=None,
        cache: KVCache | None = None,
        cache_pos=None,
        audio_rows=None,
        rows_from: int = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T - rows_from, hidden). See `forward` for the arguments.

        rows_from: the last layer computes only positions rows_from.. (it still writes every
        position's keys/values to the cache). Nothing reads the other rows' last-layer outputs:
        training takes logits at target rows only, prefill at the last row only. In a 2-layer
        decoder whose sequences are mostly audio rows this skips ~40% of the work, exactly.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if cache_pos is None:
            cache_pos = 0
        if isinstance(cache_pos, int):
            cache_pos = torch.arange(cache_pos, cache_pos + T, device=device)  # (T,) cache slots
        if attention_mask is not None:
            n_keys = attention_mask.shape[1]
        else:
            n_keys = int(cache_pos[-1]) + 1
        if cache is not None and n_keys > cache.max_len:
            raise ValueError(f"{n_keys} positions do not fit the KV cache ({cache.max_len})")
        if cache is None and n_keys != T:
            raise ValueError(
                f"without a cache attention_mask must be (B, T) = {(B, T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:  # left padding: real tokens count from 0
            position_ids = (
                (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                if attention_mask is not None
                else cache_pos[None].expand(B, T)
            )
        x = self.embed(input_ids, mel, mel_frames, audio_rows)
        c = self.config.text
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.rope_theta, x.dtype)
        mask = attention_mask_4d(attention_mask, cache_pos, n_keys)
        lm = self.language_model.model
        if not 0 <= rows_from < T:
            raise ValueError(f"rows_from must be in [0, {T}), got {rows_from}")
        last = len(lm.layers) - 1
        for i, layer in enumerate(lm.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            run = checkpointed(layer, self.gradient_checkpointing and cache is None)
            if i == last and rows_from:
                if mask is None:  # SDPA's is_causal aligns top-left: spell out the causal rows
                    keys = torch.arange(n_keys, device=device)
                    mask = (keys[None, :] <= cache_pos[rows_from:, None])[None, None]  # (1, 1, Tq, S)
                else:
                    mask = mask[:, :, rows_from:]
                x = run(x, cos, sin, mask, kv, cache_pos, n_keys, rows_from)
            else:
                x = run(x, cos, sin, mask, kv, cache_pos, n_keys)
        return lm.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mel: torch.Tensor | None = None,
        mel_frames: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_pos: int | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        audio_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, logits_to_keep, V) for the last positions only.

        input_ids (B, T) long; position_ids (B, T) long (default: from attention_mask, left padding);
        attention_mask (B, S) bool, True on real tokens: without a cache S == T, with a cache S is
        the number of cache slots used after this call (all keys so far plus these T);
        mel (A, n_mels, F) and mel_frames (A,) for the <|AUDIO|> tokens of input_ids;
        cache + cache_pos (int first slot, or (T,) long slots) to write this call's keys/values;
        audio_rows (sum N, d_audio) cached encoder outputs instead of mel (see `embed`).
        Training: call `hidden_states(...)` and apply `language_model.lm_head` to target rows only.
        """
        T = input_ids.shape[1]
        rows_from = T - logits_to_keep if 0 < logits_to_keep < T else 0  # e.g. prefill: the last row
        h = self.hidden_states(
            input_ids, position_ids, attention_mask, mel, mel_frames, cache, cache_pos, audio_rows,
            rows_from,
        )
        if h.shape[1] == 1 and cache is not None:  # a decode step (or a prefill's last row)
            return decode_linear(self.language_model.lm_head, h, self.language_model.head_panels)
        return self.language_model.lm_head(h)
