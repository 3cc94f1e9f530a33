"""Benchmark: lalm's beam search (src/lalm/beam.py) against transformers' on the same random
weights, in one process, and what beams cost against greedy decoding.

    .venv/bin/python bench/beam.py [--beams 4] [--new-tokens 32] [--trials 3] [--threads 2]

bench/generate.py's mid-size Qwen2-Audio (decoder 896 wide, 24 layers, vocab 151,936; random
weights built by transformers and saved), fp32, 100-token text prompts; `min_new_tokens` =
`max_new_tokens` so both sides decode the same number of steps. For batch 1 and batch 4
(prompts of 61-100 tokens, left padded): seconds per call for lalm greedy, lalm with beams and
transformers with beams (prefill included; after one warm-up call each: lalm packs its decode
weights and builds its kernel on first use), and whether lalm's and transformers' beam outputs
are the same token ids per row. Trials interleave the three; each figure is the median.
Nothing is asserted; figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from generate import PAD, build_checkpoint, text_prompt

from lalm import beam
from lalm import generate as gen
from lalm.processor import Example, collate
from lalm.weights import load_checkpoint

STOPS = (151643, 151645)


def run(model, hf, rows: int, n: int, beams: int, trials: int) -> str:
    """One table row: medians of lalm greedy, lalm beams, transformers beams on `rows` prompts."""
    prompts = [text_prompt(100 - 13 * i, seed=i) for i in range(rows)]
    batch = collate([Example(torch.tensor(q), torch.zeros(len(q), dtype=torch.bool), [], [], 0) for q in prompts], PAD)
    greedy = gen.SamplingOptions(max_new_tokens=n, min_new_tokens=n, stop_token_ids=STOPS)
    wide = gen.SamplingOptions(max_new_tokens=n, min_new_tokens=n, stop_token_ids=STOPS, num_beams=beams)

    def lalm_greedy():
        for _ in gen.generate(model, batch, [gen.Row(options=greedy, key=i) for i in range(rows)]):
            pass

    def lalm_beams():
        return [b.tokens for b in beam.search(model, batch, wide)]

    def hf_beams():
        with torch.inference_mode():
            out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                              max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False,
                              pad_token_id=PAD, eos_token_id=list(STOPS), suppress_tokens=[model.config.audio_token_index])
        return [row[batch.input_ids.shape[1]:].tolist() for row in out]

    times: dict[str, list[float]] = {"greedy": [], "beams": [], "hf": []}
    outs = {key: fn() for key, fn in (("greedy", lalm_greedy), ("beams", lalm_beams), ("hf", hf_beams))}  # warm-up
    for _ in range(trials):
        for key, fn in (("greedy", lalm_greedy), ("beams", lalm_beams), ("hf", hf_beams)):
            t0 = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - t0)
    m = {k: statistics.median(v) for k, v in times.items()}
    same = sum(a == b[: len(a)] for a, b in zip(outs["beams"], outs["hf"]))
    return (f"| {rows} | {m['greedy']:.2f} | {m['beams']:.2f} | {m['hf']:.2f} | "
            f"{m['hf'] / m['beams']:.2f}x | {same} of {rows} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {args.beams} beams, {args.new_tokens} new tokens, fp32")
    from transformers import Qwen2AudioForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mid"
        build_checkpoint(folder, "mid", torch.device("cpu"))
        model = load_checkpoint(folder, dtype=torch.float32)
        hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        print("\n| batch | lalm greedy (s) | lalm beams (s) | transformers beams (s) | lalm vs transformers | same ids |")
        print("|---|---|---|---|---|---|")
        for rows in (1, 4):
            print(run(model, hf, rows, args.new_tokens, args.beams, args.trials))


if __name__ == "__main__":
    main()
