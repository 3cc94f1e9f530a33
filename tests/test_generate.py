"""Generation (lalm.generate via LALM.generate/stream) against transformers' generate.

Run: .venv/bin/pytest -x -q tests/test_generate.py

Greedy parity: token ids identical to `Qwen2AudioForConditionalGeneration.generate` (fp32) on a
random tiny checkpoint that transformers built and saved, fed the same prompt ids and
WhisperFeatureExtractor features (30 s padded, as its processor does) while lalm encodes
valid frames only. `min_new_tokens=32` keeps both sides running for 32 tokens; one test lets
them stop on eos on their own.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from hf_reference import left_pad, special_ids, waveform, whisper_features

from lalm import generate as gen

N_NEW = 32
VOCAB = 512  # the "gqa" reference shape
_TINY: dict = {}


def tiny_lalm_folder(hf_folder, out_dir):
    """The reference checkpoint plus what `lalm.load` reads beside the weights: a tokenizer.json
    whose six special tokens sit at the ids the reference config uses, and generation_config.json."""
    from wordfreq import top_n_list

    from lalm.tokenizer import train_bpe

    key = str(hf_folder)
    if key not in _TINY:
        words = top_n_list("en", 3000)
        texts = [" ".join(words[i : i + 12]) for i in range(0, len(words), 7)]
        texts += ["héllo wörld, ça va? 你好，世界 🎉 naïve café"] * 3
        tok = train_bpe(texts, VOCAB)
        ids = special_ids(VOCAB)
        assert (tok.endoftext_id, tok.im_end_id, tok.audio_id) == (ids["pad"], ids["im_end"], ids["audio"])
        shutil.copytree(hf_folder, out_dir)
        tok.save(out_dir)
        (out_dir / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [ids["pad"], ids["im_end"]], "pad_token_id": ids["pad"], "do_sample": False}))
        _TINY[key] = out_dir
    return _TINY[key]


def load_tiny(hf_checkpoint, tmp_path_factory):
    """lalm.LALM on the "gqa" reference checkpoint (fp32), built once per session."""
    import lalm

    if "model" not in _TINY:
        folder = tiny_lalm_folder(hf_checkpoint("gqa"), tmp_path_factory.mktemp("tiny") / "ckpt")
        _TINY["model"] = lalm.load(folder, dtype=torch.float32)
    return _TINY["model"]


def audio(seconds: float, seed: int) -> dict:
    return {"type": "audio", "audio": {"array": waveform(seconds, seed), "sampling_rate": 16000}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "single": [{"role": "user", "content": [audio(3.0, 1), text("What is this sound?")]}],
    "two_audios": [{"role": "user", "content": [audio(1.5, 2), audio(4.2, 3), text("Which one is louder?")]}],
    "multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [audio(2.0, 4), text("Describe it.")]},
        {"role": "assistant", "content": "A tone with some noise."},
        {"role": "user", "content": "And how long is it?"},
    ],
    "voice_only": [{"role": "user", "content": [audio(2.7, 5)]}],
    "text_only": [{"role": "user", "content": "Tell me a story about the sea."}],
}


def waves_of(conversation) -> list[np.ndarray]:
    return [p["audio"]["array"] for m in conversation if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "audio"]


def hf_generate(hf, tiny, conversations, **kw) -> list[list[int]]:
    """transformers' greedy generate on the same prompt ids (left padded) and its own features."""
    ids = [tiny.prepare(c).ids.tolist() for c in conversations]
    input_ids, mask, _ = left_pad(ids, special_ids(VOCAB)["pad"])
    waves = [w for c in conversations for w in waves_of(c)]
    feats = {}
    if waves:
        f, fm = whisper_features(waves, 128)
        feats = {"input_features": f, "feature_attention_mask": fm}
    s = special_ids(VOCAB)
    kw = {"eos_token_id": [s["pad"], s["im_end"]], **kw}
    out = hf.generate(input_ids=input_ids, attention_mask=mask.long(), **feats, do_sample=False,
                      pad_token_id=s["pad"],
                      suppress_tokens=[s["audio"]], **kw)  # lalm never samples <|AUDIO|>
    return [row[input_ids.shape[1]:].tolist() for row in out]


def alone(tiny, name: str):
    """One conversation's greedy 32 tokens generated alone (cached: several tests compare to it)."""
    if name not in _ALONE:
        (_ALONE[name],) = tiny.generate(CONVERSATIONS[name], max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                        temperature=0)
    return _ALONE[name]


_ALONE: dict = {}


@pytest.mark.parametrize("name", ["single", "two_audios", "multi_turn", "voice_only"])
def test_greedy_parity_with_transformers(tiny, hf, name):
    conv = CONVERSATIONS[name]
    ours = alone(tiny, name)
    (ref,) = hf_generate(hf, tiny, [conv], max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    assert ours.token_ids == ref
    assert ours.finish_reason == "length" and len(ours.token_ids) == N_NEW
    assert ours.audio_tokens == sum(t == special_ids(VOCAB)["audio"] for t in tiny.prepare(conv).ids.tolist())


def test_batch_of_three_mixed_lengths(tiny, hf):
    names = ["two_audios", "text_only", "voice_only"]
    convs = [CONVERSATIONS[k] for k in names]
    lengths = [len(tiny.prepare(c).ids) for c in convs]
    assert len(set(lengths)) == 3
    batched = tiny.generate(convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=0)
    ref = hf_generate(hf, tiny, convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    for b, a, r, n in zip(batched, [alone(tiny, k) for k in names], ref, lengths):
        assert b.token_ids == a.token_ids == r
        assert b.prompt_tokens == n


def test_one_thread_decode_through_numpy_blas_keeps_parity(tiny, hf):
    """With one torch thread, decode-step GEMMs go through numpy's BLAS (model.decode_gemm): the
    batched greedy ids must still equal transformers'."""
    from lalm.decode_ops import decode_gemm

    names = ["two_audios", "text_only", "voice_only"]
    convs = [CONVERSATIONS[k] for k in names]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, w = torch.randn(3, 8), torch.randn(8, 5)
        with torch.no_grad():
            y = decode_gemm(x, w)
        assert not y.requires_grad and torch.allclose(y, x @ w, atol=1e-5)
        batched = tiny.generate(convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=0)
    finally:
        torch.set_num_threads(n)
    ref = hf_generate(hf, tiny, convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    assert [b.token_ids for b in batched] == ref


def test_batched_decode_runs_through_the_kernel_and_keeps_parity(tiny, hf, monkeypatch):
    """CPU fp32 decode steps of up to 16 rows multiply through lalm.kernels (where it builds):
    every GEMM of every step (4 per layer and the head), and the greedy ids still equal
    transformers'."""
    from lalm import kernels

    if kernels.decode_gemm_fn() is None:
        pytest.skip("no AVX2 + FMA CPU or no C compiler here")
    rows, real = [], kernels.decode_gemm
    monkeypatch.setattr(kernels, "decode_gemm", lambda x, panels: rows.append(x.shape[0]) or real(x, panels))
    convs = [CONVERSATIONS[k] for k in ["two_audios", "text_only", "voice_only"]]
    batched = tiny.generate(convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=0)
    assert [b.token_ids for b in batched] == hf_generate(hf, tiny, convs, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    layers = len(tiny.model.language_model.model.layers)
    assert rows == [3] * ((N_NEW - 1) * (4 * layers + 1))


def test_decode_steps_run_torch_on_one_thread_and_openblas_on_the_rest(tiny):
    """model.decode_threads: during a CPU fp32 decode step torch runs one thread and numpy's
    OpenBLAS (the step's GEMMs) as many as torch had; prefill keeps torch's threads; torch's
    count is restored after."""
    from lalm.decode_ops import numpy_openblas

    blas = numpy_openblas()
    assert blas is not None  # numpy's wheels bundle OpenBLAS
    seen = []
    hook = tiny.model.language_model.model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].shape[1], torch.get_num_threads(), blas.num_threads))
    )
    n, b = torch.get_num_threads(), blas.num_threads
    torch.set_num_threads(2)
    try:
        tiny.generate([CONVERSATIONS["single"]], max_new_tokens=4, min_new_tokens=4, temperature=0)
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(n)
        blas.set_num_threads(b)
    assert seen[0][:2] == (seen[0][0], 2) and seen[0][0] > 1  # prefill
    assert seen[1:] == [(1, 1, 2)] * 3  # three decode steps


def test_stops_on_eos_like_transformers(tiny, hf):
    """No min_new_tokens: a row that meets eos stops there (eos kept) while its batch-mate runs
    on, as in transformers (which pads the finished row). The random model seldom emits the
    real eos ids, so an id that one row's greedy output contains and the other's lacks plays eos."""
    s = special_ids(VOCAB)
    convs = [CONVERSATIONS["single"], CONVERSATIONS["multi_turn"]]
    free = tiny.generate(convs, max_new_tokens=24, temperature=0, stop_token_ids=[])
    eos = next(t for t in free[1].token_ids[3:] if t not in free[0].token_ids)
    ours = tiny.generate(convs, max_new_tokens=24, temperature=0, stop_token_ids=[eos])
    ref = hf_generate(hf, tiny, convs, max_new_tokens=24, eos_token_id=[eos])
    assert [o.finish_reason for o in ours] == ["length", "stop"]
    assert ours[0].token_ids == ref[0] == free[0].token_ids
    n = len(ours[1].token_ids)
    assert ours[1].token_ids == ref[1][:n] == free[1].token_ids[:n] and ours[1].token_ids[-1] == eos
    assert all(t == s["pad"] for t in ref[1][n:])  # transformers pads the finished row


def test_stop_token_ends_the_row(tiny):
    """Force a stop: declare a greedy token a stop token. Like vLLM, the text is the decoded ids
    (special tokens skipped), so an ordinary stop token stays in the text; eos never shows."""
    conv = CONVERSATIONS["single"]
    (free,) = tiny.generate(conv, max_new_tokens=8, temperature=0)
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    (r,) = tiny.generate(conv, max_new_tokens=8, temperature=0, stop_token_ids=[stop_at])
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: first + 1]
    assert r.text == tiny.tokenizer.decode(free.token_ids[: first + 1])


def test_kv_cache_equals_no_cache(tiny):
    """The cached decode loop picks the same ids as re-running the whole sequence every step."""
    conv = CONVERSATIONS["voice_only"]
    ex = tiny.prepare(conv)
    from lalm.processor import collate

    batch = collate([ex], tiny.tokenizer.pad_id)
    ids = batch.input_ids
    no_cache = []
    with torch.inference_mode():
        for _ in range(N_NEW):
            mask = torch.ones_like(ids, dtype=torch.bool)
            pos = torch.arange(ids.shape[1])[None]
            logits = tiny.model(ids, pos, mask, batch.mel, batch.mel_frames)[:, -1]
            nxt = int(logits.argmax())
            no_cache.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    (cached,) = tiny.generate(conv, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=0,
                              stop_token_ids=[])
    assert cached.token_ids == no_cache


def test_logprobs_are_the_models(tiny):
    """logprobs[i] = log-softmax of the model's logits (a full forward, no cache) at the chosen id."""
    from lalm.processor import collate

    conv = CONVERSATIONS["single"]
    (r,) = tiny.generate(conv, max_new_tokens=6, min_new_tokens=6, temperature=0.8, seed=1)
    batch = collate([tiny.prepare(conv)], tiny.tokenizer.pad_id)
    ids = torch.cat([batch.input_ids, torch.tensor([r.token_ids])], 1)
    with torch.inference_mode():
        logits = tiny.model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool),
                            batch.mel, batch.mel_frames)[0]
    steps = torch.arange(r.prompt_tokens - 1, r.prompt_tokens - 1 + 6)
    expected = torch.log_softmax(logits, -1)[steps, torch.tensor(r.token_ids)]
    torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-5, rtol=0)


def test_long_audio_is_windowed_not_truncated(tiny):
    """75 s -> three windows (two of <= 30 s cut at low energy + the rest): ~2 x 750 + 375 tokens."""
    from lalm import audio as A

    wave = waveform(75.0, 7)
    windows = A.split_windows(wave)
    expected = sum(A.num_audio_tokens(A.num_frames(len(w))) for w in windows)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": {"array": wave, "sampling_rate": 16000}},
                                         text("Summarise.")]}]
    (r,) = tiny.generate(conv, max_new_tokens=2, temperature=0)
    assert len(windows) == 3 and r.audio_tokens == expected
    assert 1850 <= r.audio_tokens <= 1876  # 750 + 750 + 375 when cut at exactly 30 s
    assert r.prompt_tokens == len(tiny.prepare(conv).ids) > r.audio_tokens
    assert len(r.token_ids) == 2


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    conv = CONVERSATIONS["single"]
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "temperature": 1.5, "top_p": 0.95}
    a = tiny.generate(conv, seed=123, **kw)[0].token_ids
    b = tiny.generate(conv, seed=123, **kw)[0].token_ids
    c = tiny.generate(conv, seed=321, **kw)[0].token_ids
    assert a == b and a != c
    # Per-row generators: a seeded row samples the same inside a batch as alone.
    batched = tiny.generate([CONVERSATIONS["text_only"], conv], seed=123, **kw)
    assert batched[1].token_ids == a
    greedy = alone(tiny, "single").token_ids
    top1 = tiny.generate(conv, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=1.0, top_k=1, seed=5)[0]
    assert top1.token_ids == greedy


@pytest.mark.parametrize("opts", [
    {"temperature": 0.7, "top_k": 20, "top_p": 0.5, "repetition_penalty": 1.1},
    {"temperature": 1.3, "top_k": 0, "top_p": 0.9, "repetition_penalty": 0.8},
    {"temperature": 0.0, "repetition_penalty": 1.3, "min_new_tokens": 3},
])
def test_processed_logits_equal_transformers_processors(opts):
    """The scores sampled from equal transformers' processors (repetition penalty, min new tokens,
    temperature, top-k, top-p) on the same logits and history."""
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(0)
    V, prompt = 300, 10
    logits = torch.randn(V, generator=g) * 3
    history = torch.randint(0, V, (prompt + 2,), generator=g)
    o = gen.SamplingOptions(stop_token_ids=(0, 5), **opts)
    seen = torch.zeros(V, dtype=torch.bool)
    seen[history] = True
    ours = gen.process_logits(logits, o, seen, n_generated=2)
    procs = [lp.MinNewTokensLengthLogitsProcessor(prompt, o.min_new_tokens, [0, 5]),
             lp.RepetitionPenaltyLogitsProcessor(o.repetition_penalty)]
    if not o.greedy:
        procs += [lp.TemperatureLogitsWarper(o.temperature)]
        procs += [lp.TopKLogitsWarper(o.top_k)] if o.top_k else []
        procs += [lp.TopPLogitsWarper(o.top_p)]
    ref = lp.LogitsProcessorList(procs)(history[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert bool((ours == -torch.inf).eq(ref == -torch.inf).all())


def drain(stream) -> tuple[list[str], object]:
    """A LALM.stream generator's pieces and its return value (the GenerationResult)."""
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            return pieces, stop.value


def test_stream_pieces_join_to_text(tiny):
    conv = CONVERSATIONS["two_audios"]
    pieces, result = drain(tiny.stream(conv, max_new_tokens=24, min_new_tokens=24, temperature=0))
    (r,) = tiny.generate(conv, max_new_tokens=24, min_new_tokens=24, temperature=0)
    assert "".join(pieces) == r.text == result.text
    assert result.token_ids == r.token_ids and r.text == tiny.tokenizer.decode(r.token_ids)


def test_stream_never_splits_a_character(tiny):
    """Feed a Row the ids of a multi-byte text token by token (as decoding would)."""
    s = "héllo 你好，世界 🎉 naïve café"
    ids = tiny.tokenizer.encode(s)
    assert any("\ufffd" in tiny.tokenizer.decode([i]) for i in ids)  # some tokens split characters
    row = gen.Row(prompt_ids=[1], stream=gen.TextStream(tiny.tokenizer), max_new_tokens=len(ids))
    pieces = []
    for i in ids:
        row.accept(i, 0.0, context_left=100)
        pieces.append(row.take_text())
    assert "".join(pieces) == s == row.text and all("\ufffd" not in p for p in pieces)


def test_stop_strings_cut_text_and_hold_back_while_streaming(tiny):
    s = "one two three four five"
    ids = tiny.tokenizer.encode(s)
    opts = gen.SamplingOptions(stop=("thr", "four"))
    row = gen.Row(prompt_ids=[1], options=opts, stream=gen.TextStream(tiny.tokenizer), max_new_tokens=99)
    pieces = []
    for i in ids:
        row.accept(i, 0.0, context_left=100)
        pieces.append(row.take_text())
        if row.finish_reason:
            break
    assert row.finish_reason == "stop" and row.text == "one two " and "".join(pieces) == "one two "
    assert len(row.tokens) < len(ids)


def test_continuous_batching_add_and_remove_rows(tiny):
    """Rows joining a running DecodeState (shorter and longer prompts) and leaving it early
    decode exactly what they decode alone (greedy)."""
    from lalm.processor import collate

    convs = [CONVERSATIONS["text_only"], CONVERSATIONS["two_audios"], CONVERSATIONS["voice_only"]]
    budgets = [5, 12, 20]
    alone = [tiny.generate(c, max_new_tokens=n, min_new_tokens=n, temperature=0)[0].token_ids
             for c, n in zip(convs, budgets)]
    pad = tiny.tokenizer.pad_id

    def rows(i):
        o = tiny.options(max_new_tokens=budgets[i], min_new_tokens=budgets[i], temperature=0)
        return [gen.Row(options=o, key=i)]

    batch = lambda i: collate([tiny.prepare(convs[i])], pad)
    state = gen.DecodeState.start(tiny.model, batch(0), rows(0), max_rows=3, max_len=512)
    finished = []
    for _ in range(2):
        state.step()
    assert state.fits(len(tiny.prepare(convs[1]).ids), budgets[1])
    state.add(batch(1), rows(1))  # longer prompt: live rows shift right
    state.step()
    state.add(batch(2), rows(2))  # shorter prompt: slots in at the current column
    while state.n:
        finished += state.pop_finished()
        state.step()
    assert sorted(r.key for r in finished) == [0, 1, 2]
    for r in finished:
        assert r.tokens == alone[r.key], r.key


def test_prompt_longer_than_context_is_a_typed_error(tiny):
    from lalm.errors import ContextLengthError

    too_long = [{"role": "user", "content": "word " * (tiny.config.text.max_position_embeddings + 10)}]
    with pytest.raises(ContextLengthError, match="limit"):
        tiny.generate(too_long, max_new_tokens=2)


def test_max_new_tokens_is_clipped_to_the_context(tiny):
    """A prompt 5 tokens under the context ends with finish_reason "length" at the context, no error."""
    limit = tiny.config.text.max_position_embeddings
    overhead = len(tiny.prepare([{"role": "user", "content": ""}]).ids)
    length = lambda n: overhead + len(tiny.tokenizer.encode(" the" * n))
    lo, hi = 1, limit  # binary search the word count giving a prompt of limit - 5 tokens
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if length(mid) < limit - 5 else (lo, mid)
    conv = [{"role": "user", "content": " the" * lo}]
    n_prompt = len(tiny.prepare(conv).ids)
    assert limit - 8 <= n_prompt < limit
    (r,) = tiny.generate(conv, max_new_tokens=50, temperature=0, stop_token_ids=[])
    assert r.finish_reason == "length" and r.prompt_tokens + len(r.token_ids) == limit
