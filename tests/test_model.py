"""lalm's model against transformers' Qwen2AudioForConditionalGeneration on the same random
checkpoints (fp32, CPU): logits max |diff| <= 1e-4 on every real position."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_reference import (
    SHAPES,
    conv_frames,
    conversation_ids,
    left_pad,
    n_audio_tokens,
    special_ids,
    valid_mel,
    waveform,
    whisper_features,
)

from lalm.decode_ops import fused_bias, fused_weight
from lalm.errors import AudioError, ChatFormatError
from lalm.model import KVCache, num_audio_tokens

TOL = 1e-4

# scenario -> conversations, each (turns, audio seconds); see hf_reference.conversation_ids
SCENARIOS = {
    "one_audio": [([["audio", 6]], [2.0])],
    "two_audios_one_turn": [([[2, "audio", "audio", 5]], [1.0, 3.3])],
    "multi_turn": [([["audio", 4], [7], [3, "audio"], [5], [2]], [0.7, 1.6])],
    "text_only": [([[9], [4], [6]], [])],
    "batch_of_three": [
        ([["audio", 3]], [2.6]),
        ([[12], [3]], []),
        ([[1, "audio", "audio"], [8], [2]], [0.3, 1.1]),
    ],
}


def make_inputs(shape: str, conversations, seed: int = 0):
    """Reference inputs (features padded to 3000 frames) and lalm inputs (valid frames only)."""
    spec = SHAPES[shape]
    vocab, n_mels = spec["text"]["vocab_size"], spec["audio"]["num_mel_bins"]
    waves = [
        waveform(sec, seed + 10 * i + k)
        for i, (_, secs) in enumerate(conversations)
        for k, sec in enumerate(secs)
    ]
    feats = fmask = mel = frames = None
    tokens = []
    if waves:
        feats, fmask = whisper_features(waves, n_mels)
        mel, frames = valid_mel(feats, fmask)
        tokens = [n_audio_tokens(int(f)) for f in frames]
    seqs, k = [], 0
    for i, (turns, secs) in enumerate(conversations):
        seqs.append(conversation_ids(turns, tokens[k : k + len(secs)], vocab, seed + i))
        k += len(secs)
    ids, mask, pos = left_pad(seqs, special_ids(vocab)["pad"])
    return {
        "ids": ids,
        "mask": mask,
        "pos": pos,
        "feats": feats,
        "fmask": fmask,
        "mel": mel,
        "frames": frames,
    }


def reference_logits(hf, x):
    with torch.no_grad():
        return hf(
            input_ids=x["ids"],
            attention_mask=x["mask"].long(),
            position_ids=x["pos"],
            input_features=x["feats"],
            feature_attention_mask=x["fmask"],
        ).logits


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_logits_match_transformers(hf_model, lalm_model, shape, scenario):
    x = make_inputs(shape, SCENARIOS[scenario])
    ref = reference_logits(hf_model(shape), x)
    with torch.no_grad():
        out = lalm_model(shape)(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
    assert out.shape == ref.shape
    real = x["mask"]
    assert ref[real].abs().max() > 0.5  # random O(1) weights: a wrong model cannot pass by accident
    assert (out - ref)[real].abs().max().item() <= TOL
    assert torch.isfinite(out).all()  # padding rows stay finite too (they attend to themselves)


def test_default_position_ids_and_last_logits(lalm_model):
    x = make_inputs("gqa", SCENARIOS["batch_of_three"])
    model = lalm_model("gqa")
    with torch.no_grad():
        full = model(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
        implicit = model(x["ids"], attention_mask=x["mask"], mel=x["mel"], mel_frames=x["frames"])
        last = model(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"], logits_to_keep=1)
        hidden = model.hidden_states(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
    assert torch.equal(full, implicit)
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    real = x["mask"]
    torch.testing.assert_close(
        model.language_model.lm_head(hidden[real]), full[real], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("shape", ["gqa", "mha"])
@pytest.mark.parametrize("scenario", ["batch_of_three", "one_audio"])
def test_last_layer_rows_from_equals_full(lalm_model, shape, scenario):
    """hidden_states(rows_from=r) is hidden_states()[:, r:] (padded and unpadded batches), and the
    keys/values it leaves in a cache are the full prefill's."""
    x = make_inputs(shape, SCENARIOS[scenario])
    model = lalm_model(shape)
    ids, B, T = x["ids"], *x["ids"].shape
    mask = None if scenario == "one_audio" else x["mask"]
    pos = None if mask is None else x["pos"]
    with torch.no_grad():
        full = model.hidden_states(ids, pos, mask, x["mel"], x["frames"])
        for r in (1, T // 2, T - 1):
            part = model.hidden_states(ids, pos, mask, x["mel"], x["frames"], rows_from=r)
            assert part.shape == (B, T - r, full.shape[-1])
            torch.testing.assert_close(part, full[:, r:], rtol=0, atol=1e-5)
        caches = [KVCache.for_model(model, batch=B, max_len=T) for _ in range(2)]
        model.hidden_states(ids, pos, mask, x["mel"], x["frames"], cache=caches[0], cache_pos=0)
        model.hidden_states(ids, pos, mask, x["mel"], x["frames"], cache=caches[1], cache_pos=0,
                            rows_from=T - 1)
    assert caches[0].k.abs().sum() > 0
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=1e-6)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rows_from"):
        model.hidden_states(ids, pos, mask, x["mel"], x["frames"], rows_from=T)


def test_rows_from_gives_the_same_gradients(lalm_model):
    """Training takes logits at target rows only; skipping the last layer's other rows must not
    change the loss or any gradient."""
    x = make_inputs("gqa", SCENARIOS["batch_of_three"])
    model = lalm_model("gqa")
    T = x["ids"].shape[1]
    sel = x["mask"].clone()
    sel[:, : T - 5] = False  # the "targets": the last 5 real positions of each row
    results = []
    model.train()
    try:
        for r in (0, T - 5):
            model.zero_grad(set_to_none=True)
            h = model.hidden_states(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"], rows_from=r)
            logits = model.language_model.lm_head(h[sel[:, r:]])
            loss = torch.nn.functional.cross_entropy(logits, x["ids"][sel])
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys() and "audio_tower.conv1.weight" in g0
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", ["gqa", "odd"])
def test_kv_cache_steps_equal_full_forward(lalm_model, shape):
    """Prefill a left-padded batch with audio, then feed the rest one token at a time."""
    x = make_inputs(shape, SCENARIOS["batch_of_three"])
    model = lalm_model(shape)
    ids, mask, pos = x["ids"], x["mask"], x["pos"]
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids, pos, mask, x["mel"], x["frames"])
        cache = KVCache.for_model(model, batch=B, max_len=T + 3)
        P = T - 4  # all audio tokens lie in the prefill
        assert not (ids[:, P:] == model.config.audio_token_index).any()
        steps = [
            model(
                ids[:, :P], pos[:, :P], mask[:, :P], x["mel"], x["frames"], cache=cache, cache_pos=0
            )
        ]
        for t in range(P, T):
            slot = torch.tensor([t]) if t % 2 else t  # both cache_pos forms
            steps.append(
                model(
                    ids[:, t : t + 1],
                    pos[:, t : t + 1],
                    mask[:, : t + 1],
                    cache=cache,
                    cache_pos=slot,
                )
            )
    stepped = torch.cat(steps, dim=1)
    assert (stepped - full)[mask].abs().max().item() <= TOL


def test_kv_cache_without_padding_uses_causal_prefill(lalm_model):
    x = make_inputs("mha", SCENARIOS["one_audio"])
    model = lalm_model("mha")
    ids, T = x["ids"], x["ids"].shape[1]
    with torch.no_grad():
        full = model(ids, mel=x["mel"], mel_frames=x["frames"])
        cache = KVCache.for_model(model, batch=1, max_len=T)
        first = model(ids[:, :-2], mel=x["mel"], mel_frames=x["frames"], cache=cache, cache_pos=0)
        a = model(ids[:, -2:-1], cache=cache, cache_pos=T - 2)
        b = model(ids[:, -1:], cache=cache, cache_pos=T - 1)
    assert (torch.cat([first, a, b], 1) - full).abs().max().item() <= TOL


def test_encoder_runs_on_valid_frames_only(lalm_model):
    """A 3 s clip gives the encoder ~300 mel frames (150 positions), not 3000."""
    x = make_inputs("gqa", [([["audio"]], [3.0])])
    model = lalm_model("gqa")
    seen = []
    hook = model.audio_tower.conv1.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[-1])
    )
    try:
        with torch.no_grad():
            model(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
    finally:
        hook.remove()
    assert int(x["frames"][0]) == 300
    assert seen == [conv_frames(300)] and seen[0] <= 302


def test_with_lalm_front_end(hf_model, lalm_model):
    """Same parity with mel from lalm.audio.log_mel (the front-end's floor frames) instead of slices."""
    audio = pytest.importorskip("lalm.audio")
    if not hasattr(audio, "log_mel"):
        pytest.skip("lalm.audio.log_mel not there yet")
    conversations = SCENARIOS["batch_of_three"]
    x = make_inputs("gqa", conversations)
    waves = [
        waveform(sec, 10 * i + k)
        for i, (_, secs) in enumerate(conversations)
        for k, sec in enumerate(secs)
    ]
    mels = [audio.log_mel(w, 128) for w in waves]
    frames = torch.tensor([int(n) for _, n in mels])
    assert torch.equal(frames, x["frames"])
    mel = torch.zeros(len(mels), 128, max(m.shape[-1] for m, _ in mels))
    for i, (m, _) in enumerate(mels):
        mel[i, :, : m.shape[-1]] = m
    ref = reference_logits(hf_model("gqa"), x)
    with torch.no_grad():
        out = lalm_model("gqa")(x["ids"], x["pos"], x["mask"], mel, frames)
    assert (out - ref)[x["mask"]].abs().max().item() <= TOL


def test_num_audio_tokens_formula():
    frames = torch.tensor([1, 2, 3, 4, 5, 100, 2999, 3000])
    # spec: N = ((L - 1)//2 + 1 - 2)//2 + 1; 30 s -> 750, 1 s -> 50
    assert num_audio_tokens(frames).tolist() == [0, 0, 1, 1, 1, 25, 750, 750]
    assert num_audio_tokens(torch.tensor([100 * 30, 100])).tolist() == [750, 25]


def test_mismatched_audio_tokens_raise(lalm_model):
    x = make_inputs("gqa", SCENARIOS["one_audio"])
    model = lalm_model("gqa")
    ids = x["ids"].clone()
    ids[0, (ids[0] == model.config.audio_token_index).nonzero()[0]] = 5  # one placeholder fewer
    with pytest.raises(ChatFormatError, match="do not match"):
        model(ids, mel=x["mel"], mel_frames=x["frames"])
    with pytest.raises(ChatFormatError, match="no audio"):
        model(x["ids"])


def test_bad_mel_raises(lalm_model):
    model = lalm_model("gqa")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(AudioError, match="at most 3000"):
        model.encode_audio(torch.zeros(1, 128, 3002), torch.tensor([3001]))
    with pytest.raises(AudioError, match="128"):
        model(ids, mel=torch.zeros(1, 80, 100), mel_frames=torch.tensor([100]))
    with pytest.raises(AudioError, match="valid frames"):
        model.encode_audio(torch.zeros(1, 128, 100), torch.tensor([101]))


def gradients(model, x, checkpointing: bool):
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = model.audio_tower.gradient_checkpointing = checkpointing
    model.train()
    try:
        hidden = model.hidden_states(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
        targets = x["ids"][:, 1:][x["mask"][:, :-1]]
        logits = model.language_model.lm_head(hidden[:, :-1][x["mask"][:, :-1]])
        torch.nn.functional.cross_entropy(logits, targets).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    finally:
        model.gradient_checkpointing = model.audio_tower.gradient_checkpointing = False
        model.eval()
        model.zero_grad(set_to_none=True)


def test_training_gradients_are_finite_with_padding(lalm_model):
    x = make_inputs("gqa", SCENARIOS["batch_of_three"])
    model = lalm_model("gqa")
    grads = gradients(model, x, checkpointing=False)
    assert "audio_tower.embed_positions.weight" not in grads  # frozen, as in the reference
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["audio_tower.conv1.weight"].abs().sum() > 0  # the loss reaches the encoder
    recomputed = gradients(model, x, checkpointing=True)
    assert recomputed.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_decode_layout_changes_storage_only(hf_model, lalm_model):
    """use_decode_layout (called under inference_mode, as DecodeState does): same names, shapes and
    values; the widening projections are stored transposed; logits still match transformers; the
    model still trains to the same gradients; a second call changes nothing."""
    x = make_inputs("gqa", SCENARIOS["batch_of_three"])
    model = copy.deepcopy(lalm_model("gqa"))
    # As loaded (contiguous), even if another test already decoded with the shared model.
    model.load_state_dict({n: t.contiguous() for n, t in model.state_dict().items()}, assign=True)
    grads = gradients(model, x, checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.inference_mode():
        model.use_decode_layout()
    params = dict(model.named_parameters())
    assert params.keys() == before.keys()
    assert all(torch.equal(params[n], before[n]) for n in before)
    assert not any(torch.is_inference(p) for p in params.values())
    moved = {n for n, p in params.items() if not p.is_contiguous()}
    layer = "language_model.model.layers.1."
    assert {n[len(layer):] for n in moved if n.startswith(layer)} == {
        f"self_attn.{k}_proj.weight" for k in "qkvo"} | {"mlp.gate_proj.weight", "mlp.up_proj.weight"}
    assert "language_model.lm_head.weight" in moved and not any(n.startswith("audio_tower") for n in moved)
    attn, mlp = model.language_model.model.layers[1].self_attn, model.language_model.model.layers[1].mlp
    assert fused_weight((attn.o_proj, mlp.gate_proj)) is None
    with torch.no_grad():
        w = fused_weight((attn.q_proj, attn.k_proj, attn.v_proj))
        assert w.shape == (64, 64 + 32 + 32) and torch.equal(w[:, 64:96], before[layer + "self_attn.k_proj.weight"].t())
        assert fused_weight((mlp.gate_proj, mlp.up_proj)) is not None
        b = fused_bias((attn.q_proj, attn.k_proj, attn.v_proj))  # a view, not a per-step copy
        assert b.data_ptr() == attn.q_proj.bias.data_ptr() and b.shape == (128,)
        assert torch.equal(b[64:96], before[layer + "self_attn.k_proj.bias"])
        assert fused_bias((attn.k_proj, attn.q_proj)).data_ptr() != attn.k_proj.bias.data_ptr()  # out of order: a copy
        out = model(x["ids"], x["pos"], x["mask"], x["mel"], x["frames"])
        # one row: the fused q|k|v and gate|up GEMMs of a cached decode step
        ids, pos, T = x["ids"][1:2], x["pos"][1:2], int(x["mask"][1].sum())
        ids, pos = ids[:, -T:], pos[:, -T:]
        cache = KVCache.for_model(model, batch=1, max_len=T)
        first = model(ids[:, :-1], pos[:, :-1], cache=cache, cache_pos=0)
        last = model(ids[:, -1:], pos[:, -1:], cache=cache, cache_pos=T - 1)
    ref = reference_logits(hf_model("gqa"), x)
    assert (out - ref)[x["mask"]].abs().max().item() <= TOL
    assert (torch.cat([first, last], 1)[0] - ref[1, -T:]).abs().max().item() <= TOL
    assert fused_weight((attn.q_proj, attn.k_proj, attn.v_proj)) is None  # gradients on: plain path
    again = gradients(model, x, checkpointing=False)
    for name, g in grads.items():
        torch.testing.assert_close(again[name], g, rtol=1e-5, atol=1e-6, msg=name)
    pointers = {n: p.data_ptr() for n, p in params.items()}
    model.use_decode_layout()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


def test_decode_layout_keeps_bf16_weights_contiguous(lalm_model):
    """bf16 GEMMs are much slower with transposed storage on CPU: bf16 groups are stored row after
    row (each weight still a contiguous (out, in) view, same values), fused for the decode kernel
    where it is built; a cached decode step still matches the full forward to bf16 rounding."""
    from lalm import kernels

    model = copy.deepcopy(lalm_model("gqa")).to(torch.bfloat16)
    model.load_state_dict({n: t.contiguous() for n, t in model.state_dict().items()}, assign=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.inference_mode():
        model.use_decode_layout()
    params = dict(model.named_parameters())
    assert all(p.is_contiguous() for p in params.values())
    assert all(torch.equal(params[n], before[n]) for n in before)
    attn = model.language_model.model.layers[1].self_attn
    with torch.no_grad():
        fused = fused_weight((attn.q_proj, attn.k_proj, attn.v_proj))
        if kernels.decode_gemm_fn() is None:
            assert fused is None
            return
        assert fused.shape == (64, 128) and torch.equal(fused[:, 64:96], attn.k_proj.weight.t())
        assert attn.qkv_panels.data.dtype == torch.bfloat16
        x = make_inputs("gqa", SCENARIOS["batch_of_three"])
        ids, pos, T = x["ids"][1:2], x["pos"][1:2], int(x["mask"][1].sum())
        ids, pos = ids[:, -T:], pos[:, -T:]
        full = model(ids, pos)
        cache = KVCache.for_model(model, batch=1, max_len=T)
        model(ids[:, :-1], pos[:, :-1], cache=cache, cache_pos=0)
        n = torch.get_num_threads()
        torch.set_num_threads(1)  # as inside decode_threads: the kernel path
        try:
            last = model(ids[:, -1:], pos[:, -1:], cache=cache, cache_pos=T - 1)
        finally:
            torch.set_num_threads(n)
    ref = full[0, -1].float()
    assert (last[0, -1].float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
