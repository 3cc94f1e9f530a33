"""The last decoder layer on target rows only (`hidden_states(rows_from=...)`) vs on every row.

    taskset -c 1 .venv/bin/python bench/train_rows.py --home $LALM_HOME [--batches 40 --trials 3]

Takes the first --batches batches of lalm-tiny's pre-training (configs/tiny/pretrain.yaml on a
finished demo's data, tokenizer and cached encoder rows; the cache is copied first), then times
forward + backward of the loop's loss on each batch both ways, alternating per trial, --threads,
no optimizer step (the weights stay the same, so both ways see the same model). Prints seconds per
batch, tokens/s and the largest loss difference between the two (the change must be exact).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True, help="LALM_HOME of a finished `lalm demo`")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny/pretrain.yaml"))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lalm.demo import whisper_tiny_en
    from lalm.processor import collate
    from lalm.train import losses
    from lalm.train.config import TrainConfig
    from lalm.train.loop import Trainer, _forward_rows

    demo = Path(args.home) / "demo"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(demo / "cache", Path(tmp) / "cache")
        cfg = TrainConfig.load(Path(args.config), [
            f"data={demo / 'data/pretrain/train.jsonl'}", f"tokenizer={demo / 'tokenizer'}",
            f"encoder_init={whisper_tiny_en()}", f"feature_cache={Path(tmp) / 'cache'}",
            "eval_data=null", f"out={Path(tmp) / 'run'}", "progress=false"])
        trainer = Trainer(cfg)
        trainer.setup()
        model, data = trainer.model, trainer.data
        order = data.epoch_batches(0, cfg.batch_size, cfg.length_grouping)[: args.batches]
        batches = [collate([e for i in idx for e in data.examples(i, 0)], trainer.tokenizer.pad_id)
                   for idx in order]

        def every_row(batch):  # the loop before: the last layer over all T rows
            h = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask,
                                    audio_rows=batch.audio_rows)
            sel = batch.labels != losses.IGNORE_INDEX
            return model.language_model.lm_head(h[sel]), batch.labels[sel], None

        ways = {"all rows": every_row, "rows_from": _forward_rows}
        seconds = {k: [] for k in ways}
        loss = {k: [] for k in ways}
        for _ in range(args.trials):
            for name, fn in ways.items():
                loss[name] = []
                t0 = time.perf_counter()
                for batch in batches:
                    logits, targets, _ = fn(model, batch) if fn is _forward_rows else fn(batch)
                    total = losses.rows_ce_sum(logits, targets)
                    total.backward()
                    model.zero_grad(set_to_none=True)
                    loss[name].append(float(total.detach()))
                seconds[name].append(time.perf_counter() - t0)
        tokens = sum(b.input_ids.numel() for b in batches)
        diff = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(loss["all rows"], loss["rows_from"]))
        out = {name: {"s_per_batch": round(min(s) / len(batches), 4),
                      "tokens_per_s": round(tokens / min(s))} for name, s in seconds.items()}
        out["speed-up"] = round(min(seconds["all rows"]) / min(seconds["rows_from"]), 2)
        out["max_relative_loss_diff"] = diff
        out["batches"], out["tokens"], out["batch_size"] = len(batches), tokens, cfg.batch_size
        out["threads"] = torch.get_num_threads()
        print(json.dumps(out))


if __name__ == "__main__":
    main()
