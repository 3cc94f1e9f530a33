"""Training tokens/s of the lalm-tiny pretrain config on cached encoder features (the demo's path).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/train_cached.py --home $LALM_HOME [--steps 30]

Runs `lalm.train.loop` with `feature_cache` for --steps steps of configs/tiny/pretrain.yaml on a
finished demo's data, tokenizer and cache (HOME/demo/...; the cache is copied first, so the demo's
own folder is never written), one thread, no evaluation, and prints tokens/s as the loop measures
it (tokens of the steps / their wall time; setup and the final save excluded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True, help="LALM_HOME of a finished `lalm demo`")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lalm.demo import whisper_tiny_en
    from lalm.train.config import TrainConfig
    from lalm.train.loop import train

    demo = Path(args.home) / "demo"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(demo / "cache", Path(tmp) / "cache")
        cfg = TrainConfig.load(ROOT / "configs/tiny/pretrain.yaml", [
            f"data={demo / 'data/pretrain/train.jsonl'}", f"tokenizer={demo / 'tokenizer'}",
            f"encoder_init={whisper_tiny_en()}", f"feature_cache={Path(tmp) / 'cache'}",
            f"max_steps={args.steps}", "eval_every=0", f"out={Path(tmp) / 'run'}", "progress=false"])
        res = train(cfg)
    print(json.dumps({"steps": args.steps, "tokens_per_s": round(res.last["tokens_per_s"], 1),
                      "loss": round(res.last["loss"], 4), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
