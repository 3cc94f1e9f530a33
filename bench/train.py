"""Benchmark: training tokens/s of lalm's trainer step vs transformers' model, same weights, same batch.

    .venv/bin/python bench/train.py [--batch 8] [--seconds 3] [--steps 4] [--trials 3] [--threads 0]

One step = forward + backward + AdamW step + zero_grad, fp32, on a batch of `--batch` ASR
conversations (`--seconds` of audio, a prompt, a ~25-token answer; loss on the answer only):

- lalm: what `lalm train` runs (lalm.train.loop._forward_rows): the encoder on valid mel frames,
  `hidden_states`, then `lm_head` and cross-entropy on the target rows only;
- transformers: `Qwen2AudioForConditionalGeneration(input_ids, attention_mask, input_features,
  feature_attention_mask, labels)` with the processor's 30 s-padded features, the same weights
  (lalm saves the checkpoint, transformers loads it).

The first-step losses of both are printed: equal, so both compute the same objective.
Models: the `tiny` preset (lalm-tiny: Whisper tiny.en-sized encoder, 256-wide decoder, 2048-id
vocabulary) and the same with Qwen2's 151,936-id vocabulary. Trials alternate the two
implementations and each figure is the median (the CPU is shared). Nothing is asserted;
figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from lalm.config import ModelConfig
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.processor import collate, prepare
from lalm.tokenizer import train_bpe
from lalm.train import losses
from lalm.train.build import init_weights
from lalm.train.loop import _forward_rows
from lalm.weights import save_checkpoint

ANSWER = "the quick brown fox jumps over the lazy dog"


def make_batch(tok, n_mels: int, batch: int, seconds: float):
    rng = np.random.default_rng(0)
    waves, convs = [], []
    for i in range(batch):
        n = int(16000 * seconds * (0.8 + 0.4 * rng.random()))  # lengths vary like a real batch
        t = np.arange(n) / 16000
        waves.append((0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32))
        convs.append([{"role": "user", "content": [{"type": "audio", "audio": {"array": waves[-1], "sampling_rate": 16000}},
                                                   {"type": "text", "text": "Transcribe this audio."}]},
                      {"role": "assistant", "content": ANSWER[: 20 + i * 3]}])
    ours = collate([prepare(c, tok, n_mels, add_generation_prompt=False) for c in convs], tok.pad_id)
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    f = fe(waves, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    # transformers shifts labels itself: its label at t is the token at t (ours: the token at t + 1)
    hf_labels = torch.full_like(ours.labels, -100)
    hf_labels[:, 1:] = ours.labels[:, :-1]
    hf = {"input_ids": ours.input_ids, "attention_mask": ours.attention_mask.long(),
          "input_features": f["input_features"], "feature_attention_mask": f["attention_mask"], "labels": hf_labels}
    return ours, hf


def lalm_step(model, opt, batch) -> float:
    logits, targets, _ = _forward_rows(model, batch)
    loss = losses.rows_ce_sum(logits, targets) / targets.numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, opt, inputs) -> float:
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def bench(name: str, vocab: int | None, args) -> dict:
    from transformers import Qwen2AudioForConditionalGeneration as HFModel

    tok = train_bpe([], 262)
    text = {"vocab_size": vocab} if vocab else {}
    cfg = ModelConfig.preset("tiny", text=text, audio_token_index=tok.audio_id)
    torch.manual_seed(0)
    ours = Qwen2AudioForConditionalGeneration(cfg)
    init_weights(ours)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(ours, tmp)
        ref = HFModel.from_pretrained(tmp, dtype=torch.float32)
    ours.train()
    ref.train()
    batch, hf_inputs = make_batch(tok, cfg.audio.num_mel_bins, args.batch, args.seconds)
    tokens = int(batch.attention_mask.sum())
    opts = {"lalm": torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5),
            "transformers": torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)}
    first = {"lalm": lalm_step(ours, opts["lalm"], batch), "transformers": hf_step(ref, opts["transformers"], hf_inputs)}
    runs = {"lalm": lambda: lalm_step(ours, opts["lalm"], batch),
            "transformers": lambda: hf_step(ref, opts["transformers"], hf_inputs)}
    times = {k: [] for k in runs}
    for _ in range(args.trials):
        for k, fn in runs.items():
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[k].append((time.perf_counter() - t0) / args.steps)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"\n## {name}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters, batch {args.batch} x "
          f"~{args.seconds:g} s audio, {tokens} tokens ({int((batch.labels != -100).sum())} targets)")
    print(f"first-step loss: lalm {first['lalm']:.6f}  transformers {first['transformers']:.6f}")
    for k in runs:
        print(f"{k:>13}: {tps[k]:8.0f} tokens/s  ({statistics.median(times[k]) * 1000:.0f} ms/step)")
    print(f"{'speed-up':>13}: {tps['lalm'] / tps['transformers']:.2f}x")
    return tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed trial")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, fp32, CPU")
    bench("lalm-tiny (vocab 2048)", None, args)
    bench("lalm-tiny with Qwen2 vocabulary (151936)", 151936, args)


if __name__ == "__main__":
    main()
