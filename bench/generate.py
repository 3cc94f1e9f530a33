"""Benchmark: lalm generation vs transformers on the same random weights, in the same process.

    .venv/bin/python bench/generate.py [--dtypes float32,bfloat16] [--new-tokens 32] [--trials 3]
    python bench/generate.py --device cuda --size 7b --dtypes bfloat16      # on a GPU

Mid-size Qwen2-Audio (decoder 896 wide, 24 layers, 14 heads, 2 KV heads, ffn 4864, vocab 151936;
encoder 512 wide, 6 layers, 8 heads, ffn 2048, 128 mels), or with `--size 7b` Qwen2-Audio-7B's own
shapes (decoder 4096 wide, 32 layers, 32 heads = 32 KV heads, ffn 11008, vocab 156032; the
Whisper-large-v3 encoder), built by transformers with random weights, saved, and loaded by lalm.
Prints, per dtype:

- decode tokens/s at batch 1 and batch 8 (100-token text prompts; the time from the first
  generated token to the (N+1)-th, so the prefill is not counted), for both;
- time to first token for a 5 s and a 30 s clip (waveform -> log-mel -> prefill -> first token;
  transformers pads every clip to 30 s, lalm encodes the valid frames);
- greedy parity: how many of the first new tokens lalm and transformers agree on, per row of a
  batch of three prompts of mixed lengths (the tests prove identity on tiny checkpoints on the
  CPU; this shows it on the benchmark's device and dtype, where different kernels may flip a
  near-tie of random weights' flat logits);
- the machine's memory bandwidth (a 1 GiB tensor copy, and its sum: read only) and the tokens/s
  the read bandwidth allows when every decode step reads the decoder weights once (the batch-1
  ceiling).

Trials alternate lalm and transformers and each figure is the median, since the CPU is shared.
Not a test: nothing is asserted. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lalm import audio as A
from lalm import generate as gen
from lalm.processor import Example, collate
from lalm.weights import checkpoint_files, load_checkpoint

TEXT = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "model_type": "qwen2"}
AUDIO = {"d_model": 512, "encoder_layers": 6, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048,
         "num_mel_bins": 128, "max_source_positions": 1500}
TEXT_7B = {"vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "model_type": "qwen2"}
AUDIO_7B = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
            "num_mel_bins": 128, "max_source_positions": 1500}
AUDIO_ID, BOS, EOS_A, PAD = 151646, 151647, 151648, 151643


def build_checkpoint(path: Path, size: str, device: torch.device) -> None:
    """Random weights saved as a checkpoint. The 7B shapes are built on the device in bf16 (8.4 B
    parameters: ~17 GB; an fp32 build on the CPU would take minutes)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    text, audio = (TEXT_7B, AUDIO_7B) if size == "7b" else (TEXT, AUDIO)
    torch.manual_seed(0)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=AUDIO_ID)
    default = torch.get_default_dtype()
    if size == "7b":
        torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(path))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timestamp means the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CPU = torch.device("cpu")


def timed(fn, trials: int, device: torch.device = CPU) -> list[float]:
    out = []
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bandwidth_gbs(device: torch.device, trials: int = 5) -> tuple[float, float]:
    """(copy, read) GB/s: a 1 GiB tensor copy (read + write bytes); and reading it only, which is
    what a decode step does with the weights: the faster of its sum and a matrix-vector product
    over it (either kernel alone can fall short of the memory's read rate)."""
    a = torch.ones(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    b = torch.empty_like(a)
    copy = 2 * 2**30 / min(timed(lambda: b.copy_(a), trials, device)) / 1e9
    m, v = a.view(2**14, 2**14), torch.ones(2**14, device=device)
    read = min(timed(lambda: a.sum(), trials, device) + timed(lambda: torch.mv(m.t(), v), trials, device))
    return copy, 2**30 / read / 1e9


def decoder_weight_bytes(model, dtype_bytes: int = 4) -> int:
    """Bytes one decode step must read: decoder layers, final norm and the LM head (the embedding
    table is only indexed)."""
    lm = model.language_model
    n = sum(p.numel() for p in lm.model.layers.parameters()) + lm.model.norm.weight.numel()
    return (n + lm.lm_head.weight.numel()) * dtype_bytes


def text_prompt(n: int, seed: int) -> list[int]:
    g = np.random.default_rng(seed)
    return [151644] + g.integers(100, 150000, n - 1).tolist()


def audio_prompt(n_audio: int, seed: int) -> list[int]:
    g = np.random.default_rng(seed)
    t = lambda k: g.integers(100, 150000, k).tolist()
    return [151644, *t(8), BOS, *[AUDIO_ID] * n_audio, EOS_A, *t(8), 151645, 151644, *t(2)]


# ------------------------------------------------------------------ lalm side


def lalm_tokens(model, prompts: list[list[int]], n_new: int, stamps: list[float] | None = None) -> list[list[int]]:
    """Greedy ids of a batch; `stamps` gets the time each step's tokens reached the host."""
    ex = [Example(torch.tensor(p), torch.zeros(len(p), dtype=torch.bool), [], [], 0) for p in prompts]
    opts = gen.SamplingOptions(max_new_tokens=n_new, min_new_tokens=n_new)
    rows = [gen.Row(options=opts) for _ in prompts]
    for _ in gen.generate(model, collate(ex, PAD), rows):
        if stamps is not None:
            stamps.append(time.perf_counter())  # each step reads its tokens on the host: no sync needed
    return [r.tokens for r in rows]


def lalm_decode(model, prompts: list[list[int]], n_new: int) -> float:
    """Seconds from the first generated token to the last (decode steps only)."""
    stamps: list[float] = []
    lalm_tokens(model, prompts, n_new + 1, stamps)
    return stamps[-1] - stamps[0]


def lalm_first_token(model, wave: np.ndarray) -> None:
    mels, frames = zip(*(A.log_mel(w, 128) for w in A.split_windows(wave)))
    n = sum(A.num_audio_tokens(f) for f in frames)
    ids = audio_prompt(n, 1)
    ex = Example(torch.tensor(ids), torch.zeros(len(ids), dtype=torch.bool), list(mels), list(frames), n)
    gen.DecodeState.start(model, collate([ex], PAD), [gen.Row(options=gen.SamplingOptions(max_new_tokens=1))])


# ------------------------------------------------------------------ transformers side


class _Stamps:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self, device: torch.device):
        self.t: list[float] = []
        self.device = device

    def put(self, value) -> None:
        sync(self.device)
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_tokens(model, prompts: list[list[int]], n_new: int, streamer=None) -> list[list[int]]:
    """Greedy ids of a left-padded batch."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, streamer=streamer)
    return out[:, T:].tolist()


def hf_decode(model, prompts: list[list[int]], n_new: int) -> float:
    """Seconds from the first generated token to the last (its first `put` is the prompt)."""
    stamps = _Stamps(model.device)
    hf_tokens(model, prompts, n_new + 1, stamps)
    return stamps.t[-1] - stamps.t[1]


def hf_first_token(model, fe, wave: np.ndarray) -> None:
    feats = fe([wave], sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    n = A.num_audio_tokens(int(feats["attention_mask"].sum()))
    ids = torch.tensor([audio_prompt(n, 1)], device=model.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       input_features=feats["input_features"].to(model.device, model.dtype),
                       feature_attention_mask=feats["attention_mask"].to(model.device), max_new_tokens=1,
                       do_sample=False, pad_token_id=PAD, eos_token_id=None)


# ------------------------------------------------------------------ the run


def parity(lalm, hf, n_new: int) -> list[int]:
    """Per row of a mixed-length batch of three: how many leading greedy tokens agree."""
    prompts = [text_prompt(n, 100 + n) for n in (20, 60, 100)]
    a, b = lalm_tokens(lalm, prompts, n_new), hf_tokens(hf, prompts, n_new)
    return [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb))) for ra, rb in zip(a, b)]


def run_dtype(folder: Path, dtype: torch.dtype, n_new: int, trials: int, device: torch.device) -> dict:
    from transformers import Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    lalm = load_checkpoint(folder, dtype=dtype, device=device)
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, device_map=str(device)).eval()
    fe = WhisperFeatureExtractor(feature_size=128)
    r: dict = {"parity": parity(lalm, hf, n_new)}
    for batch in (1, 8):
        prompts = [text_prompt(100, s) for s in range(batch)]
        for name, fn in (("lalm", lalm_decode), ("transformers", hf_decode)):
            fn(lalm if name == "lalm" else hf, prompts, 2)  # warm up
        runs: dict[str, list[float]] = {"lalm": [], "transformers": []}
        for _ in range(trials):  # alternate so both see the same machine load
            runs["lalm"].append(batch * n_new / lalm_decode(lalm, prompts, n_new))
            runs["transformers"].append(batch * n_new / hf_decode(hf, prompts, n_new))
        for name, v in runs.items():
            r[f"decode_b{batch}_{name}_tok_s"] = statistics.median(v)
    for seconds in (5, 30):
        wave = np.random.default_rng(seconds).standard_normal(seconds * 16000).astype(np.float32) * 0.1
        lalm_first_token(lalm, wave)
        hf_first_token(hf, fe, wave)
        runs = {"lalm": [], "transformers": []}
        for _ in range(trials):
            runs["lalm"] += timed(lambda w=wave: lalm_first_token(lalm, w), 1, device)
            runs["transformers"] += timed(lambda w=wave: hf_first_token(hf, fe, w), 1, device)
        for name, v in runs.items():
            r[f"ttft_{seconds}s_{name}_s"] = statistics.median(v)
    r["weight_bytes_fp32"] = decoder_weight_bytes(lalm, 4)
    r["weight_bytes"] = decoder_weight_bytes(lalm, torch.finfo(dtype).bits // 8)
    return r  # the models are freed on return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--size", choices=("mid", "7b"), default="mid", help="mid-size shapes or Qwen2-Audio-7B's")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # fp32 means fp32: no TF32 in either implementation
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    copy_bw, bw = bandwidth_gbs(device)
    print(f"machine: {where}, torch {torch.__version__}; {args.size} shapes; "
          f"copy bandwidth {copy_bw:.1f} GB/s (read + write), read {bw:.1f} GB/s")
    results = {"bandwidth_gbs": bw, "copy_bandwidth_gbs": copy_bw, "threads": torch.get_num_threads(),
               "device": where, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.size
        build_checkpoint(folder, args.size, device)
        names = sorted(checkpoint_files(folder))  # transformers' save layout varies across 5.x releases
        print(f"checkpoint: {len(names)} tensors; head and embedding stored as "
              f"{[n for n in names if 'lm_head' in n or 'embed_tokens' in n]}")
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            wall, cpu = time.perf_counter(), time.process_time()
            r = run_dtype(folder, dtype, args.new_tokens, args.trials, device)
            # Below ~95% another process shared our core: the figures are then slowed unevenly.
            r["cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
            gc.collect()
            results[name] = r
            limit = bw * 1e9 / r["weight_bytes"]
            print(f"\n{name}: decoder weights read per step {r['weight_bytes'] / 1e9:.2f} GB -> "
                  f"bandwidth limit {limit:.1f} tok/s at batch 1 (fp32 weights: "
                  f"{bw * 1e9 / r['weight_bytes_fp32']:.1f} tok/s)")
            print(f"{'':28}{'lalm':>10}{'transformers':>14}{'ratio':>8}")
            for key, label, unit, better_high in (
                ("decode_b1", "decode batch 1", "tok/s", True), ("decode_b8", "decode batch 8", "tok/s", True),
                ("ttft_5s", "first token, 5 s clip", "s", False), ("ttft_30s", "first token, 30 s clip", "s", False)):
                suffix = "_tok_s" if unit == "tok/s" else "_s"
                a, b = r[f"{key}_lalm{suffix}"], r[f"{key}_transformers{suffix}"]
                ratio = a / b if better_high else b / a
                print(f"{label + ' (' + unit + ')':28}{a:10.2f}{b:14.2f}{ratio:7.2f}x")
            print(f"{'batch 8 / batch 1 throughput':28}"
                  f"{r['decode_b8_lalm_tok_s'] / r['decode_b1_lalm_tok_s']:10.2f}"
                  f"{r['decode_b8_transformers_tok_s'] / r['decode_b1_transformers_tok_s']:14.2f}")
            print(f"{'batch 1 share of bw limit':28}{r['decode_b1_lalm_tok_s'] / limit:10.0%}"
                  f"{r['decode_b1_transformers_tok_s'] / limit:14.0%}")
            print(f"greedy parity (leading tokens equal, of {args.new_tokens}, rows of 20 / 60 / 100 prompt "
                  f"tokens): {r['parity']}")
            print(f"CPU time / wall time of this run: {r['cpu_share']:.0%} of {torch.get_num_threads()} core(s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
