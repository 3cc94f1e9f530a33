"""Evaluate a model on the paper's benchmarks or lalm's own eval sets, scored as the official scripts score.

  lalm eval --model PATH --data PATH [--task asr|s2tt|ser|vsc|chat|auto] [--benchmark NAME]
            [--batch-size N] [--limit N] [--output DIR] [--prompt-style base|instruct]
  lalm eval score --task TASK --predictions FILE.jsonl [--json]

--data is a benchmark folder in its released layout (librispeech, commonvoice, fleurs, aishell2,
covost2, meld, vocalsound, airbench; detected from its files, or named with --benchmark), an
official eval jsonl ({"audio","prompt","gt","source"}), a lalm eval manifest, or a folder of
manifests (e.g. the corpus's DIR/eval: every set there is evaluated, one report for all).
Predictions go to OUTPUT/predictions.jsonl (restartable: done ids are skipped; a rerun with a
smaller --limit or another --task keeps the predictions it does not score), the report to
OUTPUT/report.{md,json,png}: per source, and per subset where the eval lines name one. Under torchrun each rank takes a shard; rank 0 merges and scores.
An item whose generation failed (unreadable audio...) keeps its error in the predictions file and is
counted as skipped in the report, never scored as an empty answer.

Metrics: asr -> WER (official normaliser chain; characters for zh/yue), s2tt -> corpus BLEU,
ser/vsc -> exact-match accuracy (official) and lenient accuracy, chat -> AIR-Bench judge score
(--judge-url, --judge-model; key from $LALM_JUDGE_API_KEY or $OPENAI_API_KEY), every other
task (lalm's aqa, sound, coarse, voice chat...) -> normalised exact-match accuracy.
The paper's ASR/S2TT numbers come from the base model: use --prompt-style base for those.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from lalm.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["run", "score"], default="run",
                        help="run (generate then score; the default) or score an existing predictions file")
    parser.add_argument("--model", help="checkpoint folder (or a hub name in the local HF cache)")
    parser.add_argument("--data", help="benchmark folder, eval jsonl, or a folder of eval manifests")
    parser.add_argument("--task", default="auto", help="asr, s2tt, ser, vsc, chat, a lalm task name, or auto")
    parser.add_argument("--benchmark", help="layout of --data when detection is not wanted")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="at most N items per source")
    parser.add_argument("--output", default="lalm-eval", help="folder for predictions and the report")
    parser.add_argument("--prompt-style", choices=["base", "instruct"], default="instruct",
                        help="base: the official raw prompts (base model); instruct: a chat turn")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=None,
                        help="> 1: beam search (transformers' search); 1: greedy (default: the checkpoint's "
                             "generation_config.json, as the official scripts' generate() reads it: 1 for Qwen2-Audio)")
    parser.add_argument("--dtype", help="float32, bf16, fp16 (default: as stored)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--predictions", help="score: the predictions jsonl")
    parser.add_argument("--json", action="store_true", help="score: print the scores as JSON")
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL for the chat judge")
    parser.add_argument("--judge-model", default="gpt-4-0125-preview")
    parser.add_argument("--judge-temperature", type=float, default=1.0)
    parser.add_argument("--judge-workers", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true")


def _judge(args):
    if not args.judge_url:
        return None
    from lalm.eval.judge import Judge, JudgeConfig

    return Judge(JudgeConfig(url=args.judge_url, model=args.judge_model, temperature=args.judge_temperature,
                             workers=args.judge_workers))


def _clean(x):
    """NaN -> None, so the JSON printed is valid JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def summary_json(task: str, results: dict[str, dict]) -> dict:
    if len(results) == 1:
        (name, res), = results.items()
        return _clean({"task": name, "metrics": res["metrics"], "by_source": res["by_source"]}
                      | ({"by_subset": res["by_subset"]} if res.get("by_subset") else {}))
    return _clean({
        "task": task,
        "metrics": {f"{t}/{k}": v for t, r in results.items() for k, v in r["metrics"].items()},
        "by_source": {s: v for r in results.values() for s, v in r["by_source"].items()},
        "tasks": results,
    })


def _print_table(results: dict[str, dict]) -> None:
    from lalm.eval.report import markdown

    print(markdown(results))


def _score(args) -> int:
    from lalm.eval.runner import read_predictions, score_records

    if not args.predictions:
        raise ConfigError("lalm eval score needs --predictions FILE.jsonl")
    path = Path(args.predictions)
    if not path.is_file():
        raise ConfigError(f"{path}: no such predictions file")
    records = read_predictions(path)
    if not records:
        raise ConfigError(f"{path}: no predictions")
    results = score_records(records, args.task, judge=_judge(args))
    if args.json:
        print(json.dumps(summary_json(args.task, results), ensure_ascii=False))
    else:
        _print_table(results)
    return 0


def _device(arg: str | None) -> str | None:
    if arg:
        return arg
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def _model_id(model: str) -> str:
    """A local checkpoint by its absolute path: `--model ckpt` run from two folders names two
    models, and `./ckpt` and its absolute path one. A hub name stays as given."""
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _check_same_run(out: Path, settings: dict, model_as_given: str | None = None) -> None:
    """A restart must not mix predictions made with other settings into one file."""
    file = out / "run.json"
    if file.exists():
        try:
            before = json.loads(file.read_text())
        except json.JSONDecodeError:
            before = None
        # A run.json written before models were recorded by absolute path holds --model as given.
        legacy = settings | {"model": model_as_given} if model_as_given is not None else settings
        if before != settings and before != legacy:
            raise ConfigError(f"{out} holds predictions of another run ({file}: {before}); "
                              "use another --output or delete the folder")
    elif int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(settings, indent=2))


def _run(args) -> int:
    import lalm
    from lalm.eval import adapters, report
    from lalm.eval.runner import RunConfig, generate_predictions, score_records

    if not args.model or not args.data:
        raise ConfigError("lalm eval needs --model PATH and --data PATH (or: lalm eval score --predictions FILE)")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:  # 0 kept no item: an empty report, exit 0
        raise ConfigError("--limit must be at least 1")
    items = adapters.load(args.data, benchmark=args.benchmark, task=args.task, limit=args.limit)
    out = Path(args.output)
    if out.exists() and not out.is_dir():  # e.g. --output results.json: a traceback from mkdir otherwise
        raise ConfigError(f"--output {out}: a file, not a folder (predictions and the report go in a folder)")
    # num_beams only when given: the run.json of an earlier run stays valid
    _check_same_run(out, {"model": _model_id(args.model), "data": str(Path(args.data).resolve()),
                          "prompt_style": args.prompt_style, "max_new_tokens": args.max_new_tokens,
                          "dtype": args.dtype, **({"num_beams": args.num_beams} if args.num_beams else {})},
                    model_as_given=str(args.model))
    lm = lalm.load(args.model, dtype=args.dtype, device=_device(args.device))
    cfg = RunConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    prompt_style=args.prompt_style, progress=not args.no_progress, num_beams=args.num_beams)
    records = generate_predictions(lm, items, out / "predictions.jsonl", cfg)
    if records is None:  # not rank 0
        return 0
    results = score_records(records, args.task, judge=_judge(args))
    info = {"model": str(args.model), "data": str(args.data), "prompt_style": args.prompt_style,
            "batch_size": args.batch_size, "items": len(items),
            "num_beams": args.num_beams or getattr(getattr(lm, "defaults", None), "num_beams", 1)}
    paths = report.write(_clean(results), out, title=f"lalm eval: {Path(str(args.model)).name}", info=info)
    _print_table(results)
    print(f"report: {paths['markdown']}  {paths['json']}  {paths['png']}", file=sys.stderr)
    return 0


def run(args) -> int:
    if args.action == "score":
        return _score(args)
    try:
        return _run(args)
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
