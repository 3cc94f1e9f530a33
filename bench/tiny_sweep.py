"""The lalm-tiny recipe sweep (docs/lalm-tiny.md): many small pre-training runs side by side.

    # 1. pack cached encoder rows + token ids from a finished `lalm demo` home (CPU, ~1 min)
    .venv/bin/python bench/tiny_sweep.py export --home ~/.cache/lalm --out sweep --limit 2250
    # 1b. (optional) more ASR clips in other voices, packed the same way, for a run's "extra" key
    .venv/bin/python bench/tiny_sweep.py extra --tokenizer sweep/tokenizer --mode flite --n 3000 --out flite
    # 2. run configurations in parallel, one process each (GPU if there is one, else CPU)
    python bench/tiny_sweep.py run --data sweep --configs sweep.json      # [{"tag": ..., "lr": ...}, ...]

Each run trains the projector + a fresh Qwen2 decoder on ASR pre-training lines (raw prompt
format) from the cached Whisper tiny.en rows, and prints greedy WER (lower-cased, punctuation
stripped) on the held-out Piper voice, the real recordings and 60 training clips at the `evals`
steps, one JSON line per evaluation. The rows travel as int8 with a per-row scale, so 2,250
clips fit in ~50 MB (what a GPU machine could be sent). Keys of a configuration (defaults in
DEFAULTS): layers, hidden, ffn, heads, kv, lr, bs, steps, warmup, wd, evals, ctc (weight of a
CTC loss on the projector output; tied = through the embedding matrix), fdrop (dropout on the
rows), tmask/tmask_len (zeroed spans), fnoise, short_first/short_len (a curriculum), beta2
(AdamW's), init (a lalm checkpoint folder to start from, e.g. a demo stage's final; with
steps 0 it is only scored), ema (decay of an exponential moving average of the weights, scored beside the raw
weights as "<set>_ema"), lsmooth (label smoothing), meanswap (probability that a clip's mean row
is replaced by another clip's of the batch: a crude speaker/channel swap), chdrop (each clip loses
this fraction of its feature channels, at every row), dump (a jsonl file: every held-out prediction
at every evaluation), bpe_dropout (BPE-dropout, Provilkov et al. 2020: each training transcript is
re-tokenized at every step with this merge-skip probability, so frequent words are also heard
as the pieces rare words are spelled with), muon (torch.optim.Muon, with lr = this multiple of the
schedule's and Moonlight's AdamW-matched scaling, on the decoder layers' matrices; AdamW keeps the
embeddings, head, projector, norms and biases), muon_fp32 (1: the same update with Newton-Schulz
in float32, lalm's `train.muon.MuonAdamW`: torch's runs it in bfloat16, ~60x slower on a CPU held to AVX2),
textlm (this many text-only lines per batch, no audio, loss on every token: the decoder reads the
20k-word vocabulary it is never played; textlm_kind cover / zipf / mix, as `extra`'s text).
Not a test and not part of lalm: an experiment harness whose findings live in configs/tiny.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULTS = {"layers": 2, "hidden": 256, "ffn": 768, "heads": 4, "kv": 2, "lr": 1e-3, "bs": 16,
            "steps": 3000, "warmup": 40, "wd": 0.01, "evals": [1000, 2000, 3000], "ctc": 0.0,
            "tied": 1, "fdrop": 0.0, "tmask": 0, "tmask_len": 8, "fnoise": 0.0, "short_first": 0,
            "short_len": 5, "max_new": 40, "seed": 0, "tnoise": 0.0, "extra": [], "limit": 0,
            "beta2": 0.999, "ema": 0.0, "lsmooth": 0.0, "meanswap": 0.0, "chdrop": 0.0, "init": "", "dump": "",
            "bpe_dropout": 0.0, "muon": 0.0, "muon_fp32": 0, "textlm": 0, "textlm_kind": "cover"}


def export(home: Path, out: Path, limit: int) -> None:
    from safetensors.torch import save_file

    from lalm import chat
    from lalm.config import ModelConfig
    from lalm.data.manifest import load_records
    from lalm.demo import whisper_tiny_en
    from lalm.model import Qwen2AudioForConditionalGeneration
    from lalm.tokenizer import Tokenizer
    from lalm.train.data import raw_prompt
    from lalm.train.encoder_cache import FeatureCache
    from lalm.train.importers import load_encoder

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(home / "demo" / "tokenizer")
    tok.save(out / "tokenizer")
    model = Qwen2AudioForConditionalGeneration(ModelConfig.preset("tiny"))
    load_encoder(model, whisper_tiny_en())
    cache = FeatureCache(home / "demo" / "cache", model.audio_tower, 80)

    def pack(recs, name: str, with_target: bool) -> None:
        cache.add([str(a) for r in recs for a in chat.audios(chat.validate(r["messages"]))], progress=False)
        feats, meta = [], []
        for rec in recs:
            msgs = rec["messages"] if with_target else rec["messages"] + [{"role": "assistant", "content": "-"}]
            audios = [str(a) for a in chat.audios(chat.validate(msgs))]
            prompt, _, target = raw_prompt(msgs)
            r = chat.render_raw(prompt, tok, [cache.tokens(a) for a in audios], target=target if with_target else None)
            x = torch.cat([cache.get(a).float() for a in audios])
            feats.append(x)
            meta.append({"n": x.shape[0], "ntgt": int(sum(r.loss_mask)), "ids": r.ids,
                         "ref": rec.get("reference") or target})
        x = torch.cat(feats)
        scale = x.abs().amax(1, keepdim=True).clamp(min=1e-6) / 127
        save_file({"q": torch.round(x / scale).to(torch.int8), "scale": scale.half()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(meta))
        print(f"{name}: {len(meta)} items, {x.shape[0]} rows")

    train = [r for r in load_records(home / "demo" / "data" / "pretrain" / "train.jsonl") if r.get("task") == "asr"]
    pack(train[:limit], "train", True)
    pack(load_records(home / "corpus" / "eval" / "asr_piper.jsonl"), "piper", False)
    pack(load_records(home / "corpus" / "eval" / "asr_real.jsonl"), "real", False)


def extra(tok_dir: Path, mode: str, n: int, out: Path, text: str = "mix") -> None:
    """n more ASR clips, text from the corpus generator minus the held-out eval text, packed like
    `export`'s train set. mode: flite / flite2 (flite voices, two seeds), espeak (espeak-ng), speed (espeak-ng resampled
    by 0.8-1.2: tempo, pitch and vocal tract length), flitespeed (flite voices so resampled), corpus (flite
    at the corpus's share, else espeak-ng). text: mix (the corpus's kinds), cover (word lists that walk
    a shuffled copy of the 20k vocabulary, so n clips cover ~6.5 n distinct words), zipf (word lists
    drawn with weight rank^-0.5: frequent words often, every word sometimes)."""
    import numpy as np
    import soundfile as sf
    import soxr
    from safetensors.torch import save_file

    from lalm import chat
    from lalm.config import ModelConfig
    from lalm.data import build, render, sentences
    from lalm.data.tasks import FLITE_SHARE
    from lalm.data.voices import (
        ENGLISH_ACCENTS,
        FEMALE_VARIANTS,
        FLITE_VOICES,
        MALE_VARIANTS,
        Voice,
    )
    from lalm.demo import whisper_tiny_en
    from lalm.model import Qwen2AudioForConditionalGeneration
    from lalm.tokenizer import Tokenizer
    from lalm.train.data import raw_prompt
    from lalm.train.encoder_cache import FeatureCache
    from lalm.train.importers import load_encoder

    rng = random.Random({"flite": 11, "speed": 12, "flite2": 13, "flitespeed": 14, "espeak": 15, "corpus": 16}[mode]
                        + {"mix": 0, "cover": 100, "zipf": 200}[text])
    reserved, vocab = build.plan("full", 0)[1].reserved, sentences.wordfreq_vocab()
    walk: list[str] = []
    zipf_w = [(r + 1) ** -0.5 for r in range(len(vocab))]  # wordfreq_vocab is in frequency order

    def draw() -> tuple[str, str]:
        if text == "mix":
            return sentences.sentence(rng, vocab)
        k = rng.randint(4, 9)
        if text == "zipf":
            return "wordlist", " ".join(rng.choices(vocab, weights=zipf_w, k=k))
        while len(walk) < k:
            more = vocab[:]
            rng.shuffle(more)
            walk.extend(more)
        return "wordlist", " ".join(walk.pop() for _ in range(k))

    (out / "audio").mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        rate = rng.choice((rng.randint(115, 149), rng.randint(150, 205), rng.randint(150, 205), rng.randint(206, 250)))
        pitch = rng.randint(15, 90)
        if mode.startswith("flite") or (mode == "corpus" and rng.random() < FLITE_SHARE):
            name = rng.choice(sorted(FLITE_VOICES))
            v = Voice("flite", name, FLITE_VOICES[name][0], None, min(rate, 220), rng.choice((50, 50, pitch)))
        else:
            var = rng.choice(FEMALE_VARIANTS + MALE_VARIANTS)
            v = Voice("espeak-ng", f"{rng.choice(sorted(ENGLISH_ACCENTS))}+{var}", None, None, rate, pitch)
        for _ in range(50):
            kind, words = draw()
            if words not in reserved:
                break
        wave = render.render({"kind": "tts", "engine": v.engine, "voice": v.name, "rate": v.rate,
                              "pitch": v.pitch, "gender": v.gender, "text": sentences.spoken(kind, words),
                              "gain_db": round(rng.uniform(-10, 0), 1)})
        if mode in ("speed", "flitespeed"):  # tempo, pitch and formants all scale by f
            f = rng.choice((0.8, 0.85, 0.9, 1.1, 1.15, 1.2))
            wave = soxr.resample(wave, 16000, int(16000 / f)).astype(np.float32)
        path = out / "audio" / f"{i:06d}.wav"
        sf.write(path, wave, 16000)
        clips.append((str(path), words))
    tok = Tokenizer.load(tok_dir)
    model = Qwen2AudioForConditionalGeneration(ModelConfig.preset("tiny"))
    load_encoder(model, whisper_tiny_en())
    cache = FeatureCache(out / "cache", model.audio_tower, 80)
    cache.add([p for p, _ in clips], progress=False)
    feats, meta = [], []
    for path, words in clips:
        msgs = [{"role": "user", "content": [{"type": "audio", "audio": path},
                                             {"type": "text", "text": "Transcribe this audio."}]},
                {"role": "assistant", "content": words}]
        prompt, _, target = raw_prompt(msgs)
        r = chat.render_raw(prompt, tok, [cache.tokens(path)], target=target)
        feats.append(cache.get(path).float())
        meta.append({"n": feats[-1].shape[0], "ntgt": int(sum(r.loss_mask)), "ids": r.ids, "ref": words})
    x = torch.cat(feats)
    scale = x.abs().amax(1, keepdim=True).clamp(min=1e-6) / 127
    save_file({"q": torch.round(x / scale).to(torch.int8), "scale": scale.half()}, str(out / "train.safetensors"))
    (out / "train.json").write_text(json.dumps(meta))
    print(f"{mode}: {len(meta)} items, {x.shape[0]} rows")


def _load(data: Path, name: str, dev: str):
    from safetensors.torch import load_file

    t = load_file(str(data / f"{name}.safetensors"))
    meta = json.loads((data / f"{name}.json").read_text())
    off = 0
    for m in meta:
        m["off"], off = off, off + m["n"]
    return (t["q"].float() * t["scale"].float()).to(dev), meta


def wer(refs: list[str], hyps: list[str]) -> float:
    def words(s: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()

    errors = total = 0
    for ref, hyp in zip(refs, hyps):
        r, h = words(ref), words(hyp)
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors, total = errors + d[len(h)], total + len(r)
    return 100.0 * errors / max(total, 1)


def run_one(cfg: dict, data: Path) -> None:
    from lalm.config import ModelConfig
    from lalm.model import Qwen2AudioForConditionalGeneration
    from lalm.tokenizer import Tokenizer
    from lalm.train.muon import MuonAdamW

    cfg = {**DEFAULTS, **cfg}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg["seed"])
    tok = Tokenizer.load(data / "tokenizer")
    text = {"num_hidden_layers": cfg["layers"], "hidden_size": cfg["hidden"],
            "intermediate_size": cfg["ffn"], "num_attention_heads": cfg["heads"],
            "num_key_value_heads": cfg["kv"], "head_dim": None, "vocab_size": tok.vocab_size,
            "bos_token_id": tok.endoftext_id, "eos_token_id": tok.im_end_id}
    model = Qwen2AudioForConditionalGeneration(ModelConfig.preset("tiny", text=text, audio_token_index=tok.audio_id))
    with torch.no_grad():  # transformers' init: N(0, 0.02), zero biases
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.normal_(0, 0.02)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
    if cfg["init"]:  # a trained lalm checkpoint (its own sizes) instead of a fresh decoder
        from lalm.weights import load_checkpoint

        model = load_checkpoint(cfg["init"], dtype=torch.float32)
    model.audio_tower.requires_grad_(False)  # never run: the rows are cached
    model.to(dev).train()
    emb = model.language_model.model.embed_tokens
    X, train = _load(data, "train", dev)
    if cfg["limit"]:
        train = train[: cfg["limit"]]
    for more in cfg["extra"]:  # other packed training sets (same tokenizer), appended
        X2, train2 = _load(Path(more), "train", dev)
        for m in train2:
            m["off"] += X.shape[0]
        X, train = torch.cat([X, X2]), train + train2
    held = {k: _load(data, k, dev) for k in ("piper", "real")}
    if cfg["bpe_dropout"]:  # a second tokenizer whose BPE skips merges at random
        drop_tok = Tokenizer.load(data / "tokenizer")
        drop_tok.tk.model.dropout = cfg["bpe_dropout"]
        for m in train:  # the transcript's ids must be its plain encoding, closed by <|endoftext|>
            assert m["ids"][len(m["ids"]) - m["ntgt"]:] == tok.encode(m["ref"]) + [tok.endoftext_id], m["ref"]

    def redraw(m):  # the same item, its transcript tokenized anew with BPE-dropout
        t = drop_tok.encode(m["ref"]) + [tok.endoftext_id]
        return dict(m, ids=m["ids"][: len(m["ids"]) - m["ntgt"]] + t, ntgt=len(t))
    head = torch.nn.Linear(cfg["hidden"], tok.vocab_size).to(dev) if cfg["ctc"] and not cfg["tied"] else None
    if cfg["textlm"]:  # text-only lines, language-model style: <|endoftext|> words <|endoftext|>
        from lalm.data import build, sentences

        reserved, vocab = build.plan("full", 0)[1].reserved, sentences.wordfreq_vocab()
        zipf_w = [(r + 1) ** -0.5 for r in range(len(vocab))]  # wordfreq_vocab is in frequency order
        text_rng, walk = random.Random(1000 + cfg["seed"]), []

    def text_item() -> dict:
        """A word list walking a shuffled copy of the 20k vocabulary (cover: every word in turn) or
        drawn with weight rank^-0.5 (zipf), or a corpus sentence (mix); never a held-out line."""
        while True:
            k, kind = text_rng.randint(4, 9), cfg["textlm_kind"]
            if kind == "mix":
                words = sentences.sentence(text_rng, vocab)[1]
            elif kind == "zipf":
                words = " ".join(text_rng.choices(vocab, weights=zipf_w, k=k))
            else:
                while len(walk) < k:
                    more = vocab[:]
                    text_rng.shuffle(more)
                    walk.extend(more)
                words = " ".join(walk.pop() for _ in range(k))
            if words not in reserved:
                t = tok.encode(words) + [tok.endoftext_id]
                return {"n": 0, "off": 0, "ids": [tok.endoftext_id] + t, "ntgt": len(t), "ref": words}

    def batch(items, feats, targets=True):
        B, T = len(items), max(len(m["ids"]) for m in items)
        ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.bool)
        lab = torch.full((B, T), -100, dtype=torch.long)
        for b, m in enumerate(items):  # left padded; labels[t] = token t+1 on targets
            n = len(m["ids"])
            ids[b, T - n:], att[b, T - n:] = torch.tensor(m["ids"]), True
            if targets and m["ntgt"]:
                lab[b, T - m["ntgt"] - 1: T - 1] = torch.tensor(m["ids"][n - m["ntgt"]:])
        rows = torch.cat([feats[m["off"]: m["off"] + m["n"]] for m in items])
        return ids.to(dev), att.to(dev), lab.to(dev), rows

    def hidden(ids, att, rows, rows_from=0):  # (B, T - rows_from, hidden)
        pos = (att.long().cumsum(1) - 1).clamp(min=0)
        return model.hidden_states(ids, pos, att, audio_rows=rows, rows_from=rows_from)

    def ctc(items, rows):
        x = model.multi_modal_projector(rows)
        lp = (x @ emb.weight.T if head is None else head(x)).float().log_softmax(-1)
        seqs, lens, tgt, tlens, o = [], [], [], [], 0
        for m in items:
            seqs.append(lp[o: o + m["n"]])
            o += m["n"]
            lens.append(m["n"])
            t = m["ids"][len(m["ids"]) - m["ntgt"]: -1]  # the transcript without <|endoftext|>
            tgt += t
            tlens.append(len(t))
        L = torch.stack([F.pad(s, (0, 0, 0, max(lens) - s.shape[0])) for s in seqs], 1)
        return F.ctc_loss(L, torch.tensor(tgt, device=dev), torch.tensor(lens), torch.tensor(tlens),
                          blank=tok.endoftext_id, zero_infinity=True)

    @torch.no_grad()
    def greedy(items, feats) -> list[str]:
        model.eval()
        out = []
        for i in range(0, len(items), 32):
            chunk = [dict(m, ids=m["ids"][: len(m["ids"]) - m["ntgt"]], ntgt=0) for m in items[i: i + 32]]
            res, done = [[] for _ in chunk], [False] * len(chunk)
            for _ in range(cfg["max_new"]):  # no KV cache: short prompts, a harness
                ids, att, _, rows = batch(chunk, feats, False)
                nxt = model.language_model.lm_head(hidden(ids, att, rows, ids.shape[1] - 1)[:, -1]).argmax(-1).tolist()
                for b, t in enumerate(nxt):
                    if not done[b] and t in (tok.endoftext_id, tok.im_end_id):
                        done[b] = True
                    elif not done[b]:
                        res[b].append(t)
                    chunk[b]["ids"] = chunk[b]["ids"] + [t]
                if all(done):
                    break
            out += [tok.decode(r) for r in res]
        model.train()
        return out

    def score(step, loss) -> None:
        row = {"step": step, "loss": round(float(loss.detach()), 3), "sec": round(time.time() - t0)}
        for name, (feats, items_) in held.items():
            hyps = greedy(items_, feats)
            row[name], row[name + "_examples"] = round(wer([m["ref"] for m in items_], hyps), 1), hyps[:2]
            if cfg["dump"]:  # every prediction, for error analysis (e.g. by subset, lalm eval's grouping)
                with open(cfg["dump"], "a") as f:
                    f.writelines(json.dumps({"set": name, "step": step, "reference": m["ref"], "prediction": h}) + "\n"
                                 for m, h in zip(items_, hyps))
        row["train"] = round(wer([m["ref"] for m in train[:60]], greedy(train[:60], X)), 1)
        if cfg["ema"]:
            with torch.no_grad():
                raw = [p.detach().clone() for p in params]
                for p_, e in zip(params, ema):
                    p_.copy_(e)
                for name, (feats, items_) in held.items():
                    row[name + "_ema"] = round(wer([m["ref"] for m in items_], greedy(items_, feats)), 1)
                for p_, w in zip(params, raw):
                    p_.copy_(w)
        print(cfg.get("tag", "run"), json.dumps(row), flush=True)

    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    layers = model.language_model.model.layers
    hidden_mats = {id(p) for p in layers.parameters() if p.dim() == 2} if cfg["muon"] else set()
    opt = torch.optim.AdamW([p for p in params if id(p) not in hidden_mats], lr=cfg["lr"],
                            weight_decay=cfg["wd"], betas=(0.9, cfg["beta2"]))
    opts = [(opt, 1.0)]
    if cfg["muon"]:
        mats = [p for p in params if id(p) in hidden_mats]
        opts.append((MuonAdamW([{"params": mats, "muon": True}], lr=cfg["lr"], weight_decay=cfg["wd"])
                     if cfg["muon_fp32"] else
                     torch.optim.Muon(mats, lr=cfg["lr"], weight_decay=cfg["wd"], adjust_lr_fn="match_rms_adamw"),
                     cfg["muon"]))
    S, W, rng, order, t0 = cfg["steps"], cfg["warmup"], random.Random(cfg["seed"]), [], time.time()
    short = [m for m in train if m["ntgt"] <= cfg["short_len"]]
    for step in range(S):
        if step < cfg["short_first"]:
            items = rng.sample(short, cfg["bs"])
        else:
            if len(order) < cfg["bs"]:
                order = list(range(len(train)))
                rng.shuffle(order)
            items = [train[order.pop()] for _ in range(cfg["bs"])]
        if cfg["bpe_dropout"]:
            items = [redraw(m) for m in items]
        if cfg["textlm"]:
            items = items + [text_item() for _ in range(cfg["textlm"])]
        ids, att, lab, rows = batch(items, X)
        if cfg["tmask"]:
            rows, o = rows.clone(), 0
            for m in items:
                for _ in range(cfg["tmask"]):
                    w = rng.randint(0, cfg["tmask_len"])
                    if w and m["n"] > 2 * w:
                        s = rng.randrange(0, m["n"] - w)
                        rows[o + s: o + s + w] = 0
                o += m["n"]
        if cfg["meanswap"]:  # r_t - mean(clip) + mean(another clip of the batch)
            spans, o = [], 0
            for m in items:
                spans.append((o, o + m["n"]))
                o += m["n"]
            means = [rows[a:b].mean(0) for a, b in spans]
            rows = rows.clone()
            for i, (a, b) in enumerate(spans):
                if rng.random() < cfg["meanswap"]:
                    rows[a:b] += means[rng.randrange(len(spans))] - means[i]
        if cfg["chdrop"]:  # one channel mask per clip, the same at every row
            keep = torch.cat([(torch.rand(1, rows.shape[1], device=dev) >= cfg["chdrop"]).expand(m["n"], -1)
                              for m in items])
            rows = rows * keep / (1 - cfg["chdrop"])
        if cfg["fnoise"]:
            rows = rows + cfg["fnoise"] * torch.randn_like(rows)
        if cfg["fdrop"]:
            rows = F.dropout(rows, cfg["fdrop"])
        if cfg["tnoise"]:  # corrupt teacher-forced target tokens (inputs only): lean on the audio
            tgt_in = torch.zeros_like(lab, dtype=torch.bool)
            tgt_in[:, 1:] = lab[:, :-1] != -100
            flip = tgt_in & (torch.rand(lab.shape, device=dev) < cfg["tnoise"])
            ids = torch.where(flip, torch.randint(0, tok.endoftext_id, ids.shape, device=dev), ids)
        sel = lab != -100
        r = int(sel.any(0).nonzero()[0])  # the last layer from the first target column on
        h = hidden(ids, att, rows, r)
        loss = F.cross_entropy(model.language_model.lm_head(h[sel[:, r:]]).float(), lab[sel],
                               label_smoothing=cfg["lsmooth"])
        total = loss + cfg["ctc"] * ctc(items, rows) if cfg["ctc"] else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = cfg["lr"] * ((step + 1) / W if step < W else
                          0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - W) / max(1, S - W))))
        for o, mult in opts:
            for g in o.param_groups:
                g["lr"] = lr * mult
            o.step()
            o.zero_grad(set_to_none=True)
        if cfg["ema"]:
            with torch.no_grad():
                if step == 0:
                    ema = [p.detach().clone() for p in params]
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg["ema"])
        if step + 1 in cfg["evals"]:
            score(step + 1, loss)
    if S == 0:
        score(0, torch.tensor(float("nan")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--home", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--limit", type=int, default=2250)
    x = sub.add_parser("extra")
    x.add_argument("--tokenizer", required=True, help="the export's tokenizer folder")
    x.add_argument("--mode", choices=("flite", "flite2", "speed", "flitespeed", "espeak", "corpus"), required=True)
    x.add_argument("--text", choices=("mix", "cover", "zipf"), default="mix")
    x.add_argument("--n", type=int, default=3000)
    x.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--configs", help="JSON list of configurations (all run at once, one process each)")
    r.add_argument("--one", help="one configuration as JSON (what each process runs)")
    a = p.parse_args()
    if a.cmd == "export":
        torch.set_num_threads(1)
        export(Path(a.home).expanduser(), Path(a.out), a.limit)
    elif a.cmd == "extra":
        torch.set_num_threads(1)
        extra(Path(a.tokenizer), a.mode, a.n, Path(a.out), a.text)
    elif a.one:
        run_one(json.loads(a.one), Path(a.data))
    else:
        procs = [subprocess.Popen([sys.executable, __file__, "run", "--data", a.data, "--one", json.dumps(c)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for c in json.loads(Path(a.configs).read_text())]
        sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
