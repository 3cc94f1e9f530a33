"""What a Muon step costs next to AdamW's on a lalm-tiny-sized model, on this CPU
(`lalm train --optimizer=muon`, src/lalm/train/muon.py; docs/lalm-tiny.md stops 25-26).

    .venv/bin/python bench/optimizers.py [--threads 2] [--steps 20] [--trials 3] [--no-pins]

The training step of bench/threads.py (batch 16 of cached rows, forward + backward), then one of:
torch.optim.AdamW on every parameter (what the recipe runs); lalm's MuonAdamW (Muon with
float32 Newton-Schulz on the decoder layers' 14 matrices, AdamW on the rest); torch.optim.Muon
(bfloat16 Newton-Schulz) on the same matrices beside a torch AdamW on the rest. Trials
interleave the three; each row is the median ms per step and its ratio to AdamW's. The demo's
AVX2 pins are on unless --no-pins: bfloat16 matrix products have no AVX2 kernel, which is why
lalm's Muon orthogonalises in float32. Nothing is asserted; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from threads import (  # bench/threads.py: sets the demo's pins unless --no-pins
    TinyStep,
    machine,
    medians_table,
)

from lalm.train.muon import MuonAdamW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-pins", action="store_true", help="the CPU's own code paths, not the demo's AVX2 ones")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(f"{args.threads} threads"))
    t = TinyStep()
    hidden = {id(q) for q in t.model.language_model.model.layers.parameters() if q.dim() == 2}
    mats, rest = [q for q in t.params if id(q) in hidden], [q for q in t.params if id(q) not in hidden]

    def optimizers(kind: str) -> list[torch.optim.Optimizer]:
        if kind == "AdamW (torch)":
            return [torch.optim.AdamW(t.params, lr=1e-4)]
        if kind == "MuonAdamW (lalm, fp32 Newton-Schulz)":
            return [MuonAdamW([{"params": mats, "muon": True}, {"params": rest}], lr=1e-4)]
        return [torch.optim.Muon(mats, lr=1e-4, adjust_lr_fn="match_rms_adamw"), torch.optim.AdamW(rest, lr=1e-4)]

    def step(opts) -> None:
        t.backward()
        for o in opts:
            o.step()
        t.model.zero_grad(set_to_none=True)

    kinds = ["AdamW (torch)", "MuonAdamW (lalm, fp32 Newton-Schulz)", "torch.optim.Muon (bf16) + AdamW"]
    ms: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.trials):
        for k in kinds:
            t.reset()
            opts = optimizers(k)
            step(opts)  # warm-up: state allocation, thread pool
            start = time.perf_counter()
            for _ in range(args.steps):
                step(opts)
            ms[k].append(1000 * (time.perf_counter() - start) / args.steps)
    print(f"\n{len(mats)} Muon matrices; {args.steps} steps x {args.trials} trials\n")
    print(medians_table(["optimizer", "ms per step (median)", "vs AdamW"], ms))


if __name__ == "__main__":
    main()
