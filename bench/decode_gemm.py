"""Few-row fp32 GEMMs over a whole decoder's weights: torch (MKL) vs numpy (OpenBLAS) vs lalm.kernels.

    OPENBLAS_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/decode_gemm.py --threads 1
    .venv/bin/python bench/decode_gemm.py --threads 2 --rows 1,2,3,8,16

A decode step's GEMMs for the issue-3 mid-size config (24 layers, 896 wide, 2 KV heads of 64,
ffn 4864, tied LM head over 151,936 ids; ~2 GB of fp32 weights, so they stream from memory, not
cache), weights stored (in, out) as `use_decode_layout` keeps them, at 1 and 8 rows, the two
libraries alternating, 5 steps each; our kernel reads the same weights packed into its panels.
Why `decode_ops.decode_gemm` calls our kernel for decode steps of up to 16 rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from lalm import kernels

L, H, F, KV, V = 24, 896, 4864, 128, 151936


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (OpenBLAS: OPENBLAS_NUM_THREADS)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", default="1,8", help="comma-separated row counts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    torch.manual_seed(0)
    # per layer: q|k|v (H -> H + 2 KV), o (H -> H), gate|up (H -> 2F), down (F -> H)
    layers = [[torch.randn(H, H + 2 * KV) * 0.02, torch.randn(H, H) * 0.02,
               torch.randn(H, 2 * F) * 0.02, torch.randn(F, H) * 0.02] for _ in range(L)]
    head = torch.randn(H, V) * 0.02
    nbytes = 4 * (sum(w.numel() for ws in layers for w in ws) + head.numel())

    def with_torch(x):
        for qkv, o, gu, d in layers:
            x @ qkv, x @ o
            g = x @ gu
            x = (g[:, :F] * g[:, F:]) @ d
        return x @ head

    def with_numpy(x):
        x = x.numpy()
        for qkv, o, gu, d in layers:
            x @ qkv.numpy(), x @ o.numpy()
            g = x @ gu.numpy()
            x = (g[:, :F] * g[:, F:]) @ d.numpy()
        return x @ head.numpy()

    fns = [("torch (MKL)", with_torch), ("numpy (OpenBLAS)", with_numpy)]
    if kernels.decode_gemm_fn() is not None:
        packed = [[kernels.Panels.pack(w.t()) for w in ws] for ws in layers]
        packed_head = kernels.Panels.pack(head.t())

        def with_kernel(x):
            for qkv, o, gu, d in packed:
                kernels.decode_gemm(x, qkv), kernels.decode_gemm(x, o)
                g = kernels.decode_gemm(x, gu)
                x = kernels.decode_gemm(g[:, :F] * g[:, F:], d)
            return kernels.decode_gemm(x, packed_head)

        fns.append(("lalm.kernels", with_kernel))
    print(f"{nbytes / 1e9:.2f} GB of weights, torch threads {args.threads}")
    for rows in map(int, args.rows.split(",")):
        x = torch.randn(rows, H) * 0.1
        best = {}
        for _ in range(2):
            for name, fn in fns:
                fn(x)
                t = time.perf_counter()
                for _ in range(args.steps):
                    fn(x)
                best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / args.steps)
        for name, s in best.items():
            print(f"{rows} rows  {name:17s} {s * 1e3:7.1f} ms/step  {rows / s:6.1f} tok/s")


if __name__ == "__main__":
    main()
