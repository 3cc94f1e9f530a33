"""What the demo's cap of 4 torch threads costs on a machine with more cores, and which thread
counts give the 1-thread arithmetic (demo.yaml `threads`, docs/lalm-tiny.md stop 23).

    .venv/bin/python bench/threads.py [--threads 1,2,4,8,16] [--steps 20] [--trials 3] [--no-pins]

One step = forward + backward + AdamW step of a lalm-tiny-sized model (the `tiny` preset, 2,048
ids, frozen encoder) on a batch of 16 cached-row examples as `lalm train` runs them (the last layer
from the first target row, loss on target rows): ~75-100 audio rows and ~40 text tokens each,
random but fixed. The demo's code-path pins (ATEN_CPU_CAPABILITY / MKL_CBWR / ONEDNN_MAX_CPU_ISA
= AVX2, set by importing lalm.demo) are on unless --no-pins. For each thread count: tokens/s (median of the trials, counts interleaved) and
whether the gradients of the first step equal the 1-thread ones bit for bit. Nothing is asserted;
figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if "--no-pins" not in sys.argv:
    import lalm.demo  # noqa: F401 (sets the demo's AVX2 pins before torch computes anything)

import torch
import torch.nn.functional as F

from lalm.config import ModelConfig
from lalm.model import Qwen2AudioForConditionalGeneration


def batch(cfg: ModelConfig, b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(75, 101, (b,), generator=g)
    text = torch.randint(30, 51, (b,), generator=g)
    lens = audio + text
    T = int(lens.max())
    ids = torch.randint(0, cfg.text.vocab_size - 8, (b, T), generator=g)
    mask = torch.zeros(b, T, dtype=torch.bool)
    labels = torch.full((b, T), -100)
    for i in range(b):
        n = int(audio[i])
        ids[i, 1: 1 + n] = cfg.audio_token_index
        mask[i, : lens[i]] = True
        labels[i, n + 10: lens[i]] = ids[i, n + 10: lens[i]]  # the answer after a ~9-token prompt
    rows = torch.randn(int(audio.sum()), cfg.audio.d_model, generator=g)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    return ids, pos, mask, labels, rows, int(mask.sum())


class TinyStep:
    """A lalm-tiny-sized model (the `tiny` preset, 2,048 ids, frozen encoder, seeded) and one fixed
    `batch`; `backward()` is a training step's forward + backward as `lalm train` runs it."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = ModelConfig.preset("tiny", text={"vocab_size": 2048}, audio_token_index=2045)
        self.model = Qwen2AudioForConditionalGeneration(self.cfg)
        self.model.audio_tower.requires_grad_(False)
        self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.ids, self.pos, self.mask, self.labels, self.rows, self.tokens = batch(self.cfg)
        self.sel = self.labels != -100
        self.first = int(self.sel.any(0).nonzero()[0])  # the first target column (rows_from)
        self.params = [q for q in self.model.parameters() if q.requires_grad]

    def reset(self) -> None:
        self.model.load_state_dict(self.init)
        self.model.zero_grad(set_to_none=True)

    def backward(self) -> None:
        m, f, sel = self.model, self.first, self.sel[:, self.first:]
        h = m.hidden_states(self.ids, self.pos, self.mask, audio_rows=self.rows, rows_from=f)
        F.cross_entropy(m.language_model.lm_head(h[sel]), self.labels[:, f:][sel]).backward()


def machine(threads: str) -> str:
    """One line: the CPU, threads, torch and its code paths."""
    return (f"{platform.processor() or platform.machine()}, {threads}, torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ.get('MKL_CBWR', '(unset)')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


def medians_table(header: list[str], samples: dict, extra: dict | None = None) -> str:
    """A Markdown table: per arm (label -> measurements), its median and the ratio to the first
    arm's; `extra` adds one more column per arm. Header: label, median, ratio[, extra]."""
    base = statistics.median(next(iter(samples.values())))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in samples.items():
        m = statistics.median(values)
        cells = [str(label), f"{m:,.0f}", f"{m / base:.2f}x"] + ([extra[label]] if extra else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-pins", action="store_true", help="the CPU's own code paths, not the demo's AVX2 ones")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = [int(t) for t in args.threads.split(",") if int(t) <= cores]
    print(machine(f"{cores} usable cores"))
    s = TinyStep()

    def step(opt) -> None:
        s.backward()
        opt.step()
        s.model.zero_grad(set_to_none=True)

    def grads(threads: int) -> dict:
        torch.set_num_threads(threads)
        s.reset()
        s.backward()
        return {n: q.grad.clone() for n, q in s.model.named_parameters() if q.grad is not None}

    one = grads(1)
    same = {t: all(torch.equal(one[n], g) for n, g in grads(t).items()) for t in counts}
    rates: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(args.trials):
        for t in counts:
            torch.set_num_threads(t)
            s.reset()
            opt = torch.optim.AdamW(s.params, lr=1e-4)
            step(opt)  # warm-up (thread pool, allocator)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(opt)
            rates[t].append(s.tokens * args.steps / (time.perf_counter() - start))
    print(f"batch 16, {s.tokens} tokens per step; {args.steps} steps x {args.trials} trials\n")
    print(medians_table(["threads", "tokens/s (median)", f"vs {counts[0]}", "gradients = 1 thread's"], rates,
                        {t: "yes" if same[t] else "no" for t in counts}))


if __name__ == "__main__":
    main()
