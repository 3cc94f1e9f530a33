"""Serving throughput: N concurrent clients vs the same requests sent one at a time.

    .venv/bin/python bench/serve.py                       # tiny random model, 32 clients
    .venv/bin/python bench/serve.py --model PATH --clients 32 --max-tokens 64
    .venv/bin/python bench/serve.py --size mid --threads 2     # a GEMM-bound decoder

Starts `lalm serve` in a subprocess (so the clients do not share its interpreter), sends
the requests sequentially, then all at once (streaming, greedy), checks that both runs
produced identical answers, and prints wall time, completion tokens/s, requests/s and
time to first token, plus a markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def wav_b64(seconds: float, seed: int) -> str:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def make_requests(n: int, max_tokens: int, audio_seconds: float) -> list[dict]:
    """Half voice-chat turns (audio only), half audio + question; greedy, streamed."""
    reqs = []
    for i in range(n):
        content = [{"type": "input_audio",
                    "input_audio": {"data": wav_b64(audio_seconds * (0.5 + (i % 4) / 4), i),
                                    "format": "wav"}}]
        if i % 2:
            content.append({"type": "text", "text": f"What is in clip {i}? Describe it."})
        reqs.append({"messages": [{"role": "user", "content": content}], "temperature": 0,
                     "max_tokens": max_tokens, "stream": True,
                     "stream_options": {"include_usage": True}})
    return reqs


async def one(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                piece = c["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "tokens": usage["completion_tokens"],
            "ttft": (first or end) - t0, "latency": end - t0}


async def run(url: str, reqs: list[dict], concurrent: bool) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        t0 = time.perf_counter()
        if concurrent:
            out = await asyncio.gather(*(one(c, url, r) for r in reqs))
        else:
            out = [await one(c, url, r) for r in reqs]
        return time.perf_counter() - t0, list(out)


def decode_scaling(model: str, dtype: str, threads: int) -> dict[int, float]:
    """Decode tokens/s of `DecodeState.step` alone at batch 1, 8, 32 (no HTTP, no prefill):
    the ceiling continuous batching can reach on this machine."""
    import torch

    import lalm
    from lalm import generate as gen
    from lalm.processor import collate

    torch.set_num_threads(threads)
    m = lalm.load(model, dtype=dtype)
    ex = m.prepare([{"role": "user", "content": "Tell me about the sounds of the city."}])
    out = {}
    for b in (1, 8, 32):
        # num_beams=1 as `lalm serve` decodes (a checkpoint's num_beams is for offline decoding)
        rows = [gen.Row(options=m.options(max_new_tokens=200, min_new_tokens=200, temperature=0,
                                          num_beams=1), key=i) for i in range(b)]
        state = gen.DecodeState.start(m.model, collate([ex] * b, m.tokenizer.pad_id), rows,
                                      max_rows=b, max_len=len(ex) + 201)
        state.step()
        t0 = time.perf_counter()
        for _ in range(30):
            state.step()
        out[b] = 30 * b / (time.perf_counter() - t0)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a tiny random model built here)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--audio-seconds", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", choices=("tiny", "mid"), default="tiny",
                    help="built model's decoder: the test preset's, or bench/generate.py's mid-size "
                         "shapes (896 wide, 24 layers, ffn 4864; vocab 512)")
    ap.add_argument("--threads", type=int, default=1,
                    help="server's torch threads (1: on a shared 2-core box, OpenMP sync between "
                         "2 threads costs more than a tiny model's matmuls)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from lalm.serve.fake import tiny_random_checkpoint

        mid = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
               "num_attention_heads": 14, "num_key_value_heads": 2}
        model = str(tiny_random_checkpoint(Path(tmp.name) / f"{args.size}-random",
                                           text=mid if args.size == "mid" else None))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lalm", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(args.clients), "--dtype", args.dtype,
           "--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                raise SystemExit("server did not start")
            time.sleep(0.2)
        reqs = make_requests(args.clients, args.max_tokens, args.audio_seconds)
        asyncio.run(run(url, reqs[:2], False))  # warm-up
        t_seq, seq = asyncio.run(run(url, reqs, False))
        t_con, con = asyncio.run(run(url, reqs, True))
    finally:
        server.terminate()
        server.wait(60)

    same = [a["text"] for a in seq] == [b["text"] for b in con]
    tokens = sum(r["tokens"] for r in con)
    speedup = t_seq / t_con
    ttft = lambda rs, q: float(np.percentile([r["ttft"] for r in rs], q))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; server torch threads {args.threads}")
    print(f"model: {Path(model).name} ({args.dtype}); {args.clients} requests, "
          f"max_tokens {args.max_tokens}, {tokens} completion tokens in total")
    print(f"sequential: {t_seq:7.2f} s  {tokens / t_seq:8.1f} tok/s  {len(reqs) / t_seq:6.2f} req/s"
          f"  TTFT p50 {ttft(seq, 50):.3f} s")
    print(f"concurrent: {t_con:7.2f} s  {tokens / t_con:8.1f} tok/s  {len(reqs) / t_con:6.2f} req/s"
          f"  TTFT p50 {ttft(con, 50):.3f} s, p95 {ttft(con, 95):.3f} s")
    print(f"speedup: {speedup:.2f}x   identical greedy outputs: {same}")
    scaling = decode_scaling(model, args.dtype, args.threads)
    print("decode only (DecodeState.step): " + ", ".join(
        f"batch {b}: {v:.0f} tok/s" for b, v in scaling.items()))
    print("\nmarkdown row:")
    print(f"| {Path(model).name} | {args.dtype} | {args.clients} | {args.max_tokens} | "
          f"{tokens / t_seq:.1f} | {tokens / t_con:.1f} | {speedup:.1f}x | "
          f"{ttft(con, 50):.2f} / {ttft(con, 95):.2f} | {'yes' if same else 'NO'} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
