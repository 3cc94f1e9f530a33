"""Generate predictions for eval items, then score them; restartable and data-parallel.

Generation follows the official scripts: `do_sample=False`, `max_new_tokens=256`, `min_new_tokens=1`,
the rest from the checkpoint's generation_config.json as transformers' `generate` reads it
(greedy for Qwen2-Audio; beam search where it sets `num_beams`, or with `--num-beams`),
left-padded batches (lalm's batched output equals each conversation alone, so items are
batched by length to save padding). Each finished batch is appended to the predictions
file at once, so a killed run restarts where it stopped: items whose (source, id) is already
in the file are skipped. At the end the file is rewritten in item order.

Under torchrun (WORLD_SIZE > 1) each rank takes a contiguous shard, as the official
`InferenceSampler` does, and writes `<predictions>.rank<r>`; after a barrier rank 0 merges
the shards into the predictions file in item order, scores and reports.

The prompt style decides what the model sees for benchmark items: `base` is the official raw
prompt (`<|audio_bos|><|AUDIO|><|audio_eos|>` + prompt, no chat markup: the paper's ASR and
S2TT numbers come from the base model), `instruct` a user turn with the audio and an
instruction. Chat items and lalm's own manifests are always conversations.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lalm.errors import LalmError
from lalm.eval import metrics
from lalm.eval.adapters import EvalItem
from lalm.eval.prompts import AUDIO_PLACEHOLDER

PROMPT_STYLES = ("base", "instruct")


@dataclass
class RunConfig:
    batch_size: int = 8
    max_new_tokens: int = 256
    prompt_style: str = "instruct"
    progress: bool = True
    num_beams: int | None = None  # None: the checkpoint's generation_config (as transformers' generate); > 1: beams


def conversation(item: EvalItem, style: str) -> Any:
    """What `LALM.generate` receives for one item."""
    if item.messages is not None:
        return item.messages
    audio_parts = [{"type": "audio", "audio": a} for a in item.audio]
    if item.task == "chat":
        text = item.question or item.instruction or ""
        return [{"role": "user", "content": audio_parts + [{"type": "text", "text": text}]}]
    if style == "base":
        return {"prompt": AUDIO_PLACEHOLDER * len(item.audio) + (item.prompt or ""), "audios": list(item.audio)}
    return [{"role": "user", "content": audio_parts + [{"type": "text", "text": item.instruction or ""}]}]


def prediction_record(item: EvalItem, prediction: str, error: str | None = None) -> dict:
    rec = {"id": item.id, "source": item.source, "lang": item.lang, "task": item.task,
           "prediction": prediction, "reference": item.reference}
    if item.task == "chat" or item.question is not None:
        rec["question"] = item.question or ""
    if item.meta_info is not None:
        rec["meta_info"] = item.meta_info
    for key in ("origin", "subset"):
        if item.extra.get(key):
            rec[key] = item.extra[key]
    if error is not None:
        rec["error"] = error
    return rec


def read_predictions(path: Path) -> list[dict]:
    """Prediction records of a jsonl file; a torn last line (a killed run) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise LalmError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return records


def _key(rec: dict) -> tuple[str, str]:
    return (str(rec.get("source", "")), str(rec.get("id", "")))


def shard(items: list, rank: int, world: int) -> list:
    """The official InferenceSampler's contiguous shards (the first ranks take one more)."""
    size, left = divmod(len(items), world)
    sizes = [size + int(r < left) for r in range(world)]
    begin = sum(sizes[:rank])
    return items[begin : begin + sizes[rank]]


def _generate(lm, items: list[EvalItem], cfg: RunConfig) -> list[tuple[str, str | None]]:
    convs = [conversation(it, cfg.prompt_style) for it in items]
    kw = {"max_new_tokens": cfg.max_new_tokens, "temperature": 0, "min_new_tokens": 1, "batch_size": cfg.batch_size,
          "num_beams": cfg.num_beams}
    try:
        return [(r.text, None) for r in lm.generate(convs, **kw)]
    except LalmError:
        if len(items) == 1:
            raise
    # One bad item (unreadable audio, too long a prompt) must not sink its batch-mates.
    out = []
    for it, conv in zip(items, convs, strict=True):
        try:
            out.append((lm.generate([conv], **kw)[0].text, None))
        except LalmError as e:
            out.append(("", str(e)))
    return out


def _dist():
    """(rank, world, torch.distributed or None); initialises the group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            # Bind this rank's GPU (as the cli loads the model: cuda:LOCAL_RANK). Unbound, NCCL's
            # barrier runs on the current device, cuda:0 on every rank, and hangs there.
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank, world, dist


def generate_predictions(lm, items: list[EvalItem], path: str | Path, cfg: RunConfig) -> list[dict] | None:
    """Fill `path` with one prediction per item; returns the records on rank 0 (None elsewhere)."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rank, world, dist = _dist()
    mine = shard(items, rank, world)
    out_path = path if world == 1 else path.with_name(f"{path.name}.rank{rank}")
    # A record that failed (unreadable audio, too long a prompt) is tried again: the cause may be
    # fixed by now; its new line, appended, replaces the old one in _merge.
    # A record made for another task (an official jsonl run again with another --task: another
    # instruction) is no answer to this item either: generated again, the new line replaces it.
    done = {_key(r): r.get("task") for p in {path, out_path} for r in read_predictions(p) if not r.get("error")}
    # Similar lengths batch together (less padding; greedy output does not depend on the batch).
    todo = sorted((it for it in mine if it.key not in done or done[it.key] not in (None, it.task)), key=_audio_bytes)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"eval[{rank}]" if world > 1 else "eval",
               unit="item", disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    with open(out_path, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), cfg.batch_size):
            chunk = todo[s : s + cfg.batch_size]
            f.writelines(json.dumps(prediction_record(item, text, error), ensure_ascii=False) + "\n" for item, (text, error) in zip(chunk, _generate(lm, chunk, cfg), strict=True))
            f.flush()
            bar.update(len(chunk))
    bar.close()
    if dist is not None:
        dist.barrier()
    if rank != 0:
        return None
    _merge(path, items, world)  # one file, in item order
    by_key = {_key(r): r for r in read_predictions(path)}
    return [by_key[it.key] for it in items if it.key in by_key]


def _audio_bytes(item: EvalItem) -> int:
    """Audio file sizes: a cheap stand-in for duration when grouping items into batches."""
    return sum(os.path.getsize(a) for a in item.audio if isinstance(a, str) and os.path.isfile(a))


def _merge(path: Path, items: list[EvalItem], world: int) -> None:
    by_key = {_key(r): r for r in read_predictions(path)}
    shard_files = [path.with_name(f"{path.name}.rank{r}") for r in range(world)]
    for f in shard_files:
        by_key.update({_key(r): r for r in read_predictions(f)})
    tmp = path.with_name(path.name + ".tmp")
    keys = {it.key for it in items}
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            if it.key in by_key:
                f.write(json.dumps(by_key[it.key], ensure_ascii=False) + "\n")
        # Predictions of items outside this run (an earlier run without --limit, or of another
        # --task) stay in the file: a quick `--limit 5` rerun must not throw away hours of work.
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for k, r in by_key.items() if k not in keys)
    tmp.replace(path)
    for f in shard_files:
        f.unlink(missing_ok=True)


def score_records(records: list[dict], task: str = "auto", judge=None) -> dict[str, dict]:
    """{task: {"metrics", "by_source"[, "by_subset"]}}; with task "auto", records group by their
    "task" field. Records with a "subset" (lalm's eval manifests: the kind of sentence or question)
    are also scored per (source, subset): by_subset = {source: {subset: metrics}}.

    A record whose generation failed (it has an "error": unreadable audio, too long a prompt) has
    no prediction to score: it is left out of every score and counted as "skipped", overall and
    per source (AIR-Bench's score_chat.py likewise skips a row that has no response)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        for key in ("prediction", "reference"):
            if key not in r:
                raise LalmError(f"prediction record {r.get('id')!r} has no {key!r}")
        t = str(r.get("task") or task) if task == "auto" else task
        groups.setdefault(t, []).append(r)
    results = {}
    for t, group in sorted(groups.items()):
        results[t] = _score_group(t, [r for r in group if not r.get("error")], judge)
        _count_skipped(results[t], [r for r in group if r.get("error")])
    return results


def _score_group(t: str, group: list[dict], judge) -> dict:
    if not group:  # every item of the task failed: nothing to score
        return {"metrics": {"count": 0}, "by_source": {}}
    if t in metrics.CHAT_TASKS:
        if judge is None:
            return {"metrics": {"count": len(group), "note": "not scored: no --judge-url"}, "by_source": {}}
        from lalm.eval.judge import score_chat

        return score_chat(group, judge)
    result = metrics.scorer_for(t)(group)
    subsets: dict[str, dict[str, list[dict]]] = {}
    for r in group:
        if r.get("subset"):
            subsets.setdefault(str(r.get("source", "")), {}).setdefault(str(r["subset"]), []).append(r)
    if subsets:
        result["by_subset"] = {
            src: {name: metrics.scorer_for(t)(recs)["metrics"] for name, recs in sorted(by.items())}
            for src, by in sorted(subsets.items())}
    return result


def _count_skipped(result: dict, failed: list[dict]) -> None:
    """"skipped" counts beside "count", only where there are some (a clean run reads as before)."""
    if not failed:
        return
    result["metrics"]["skipped"] = len(failed)
    for r in failed:
        entry = result["by_source"].setdefault(str(r.get("source", "")), {"count": 0})
        entry["skipped"] = entry.get("skipped", 0) + 1
