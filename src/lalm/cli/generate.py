"""Batch generation over a JSONL file, restartable.

  lalm generate --model PATH --input in.jsonl --output out.jsonl [--batch-size 8]
                [--max-new-tokens N] [--temperature T]

Each input line is {"id": ..., "messages": [...]} (audio paths relative to the input file);
each output line is {"id", "text", "token_ids", "logprobs", "prompt_tokens", "audio_tokens",
"finish_reason"}. Ids already answered in the output are skipped, so an interrupted run picks up
where it stopped. A bad line (invalid JSON, a missing field, an unreadable audio, a prompt longer
than the context) gets {"id", "error"} and the run goes on; a rerun tries those ids again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lalm.cli import add_decoding_options, decoding_options
from lalm.errors import ConfigError, LalmError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder or hub name (local HF cache)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL: {\"id\", \"messages\"} per line")
    parser.add_argument("--output", required=True, type=Path, help="JSONL results (appended; restartable)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_decoding_options(parser)


def _resolve(value: Any, base: Path) -> Any:
    """A relative audio path -> a path under `base`; URLs, data: URLs and non-strings unchanged."""
    if isinstance(value, dict) and "url" in value:  # OpenAI's {"audio_url": {"url": ...}}
        return {**value, "url": _resolve(value["url"], base)}
    if not isinstance(value, str) or value.startswith("data:") or "://" in value:
        return value
    return str(base / Path(value).expanduser())  # an absolute path stays as it is


def _relative_audio(messages: Any, base: Path) -> Any:
    """Audio paths in the messages, resolved against the input file's folder."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = []
            for p in m["content"]:
                if isinstance(p, dict):
                    # every key chat._part reads an audio source from
                    p = {k: _resolve(v, base) if k in ("audio", "audio_url", "path", "url") else v
                         for k, v in p.items()}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


def done_ids(output: Path) -> set[str]:
    """Ids already answered (complete lines only: a line cut by a crash is redone). Error lines
    are removed from `output` first: their ids are tried again (the audio may be fixed by now),
    and the file keeps one line per id."""
    ids: set[str] = set()
    if not output.exists():
        return ids
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
            if "error" in rec:
                continue
            ids.add(json.dumps(rec["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
        kept.append(line)
    if len(kept) < len(lines):
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(output)  # atomic: a kill here leaves the old file or the new, never half
    return ids


def read_input(path: Path) -> list[tuple[Any, Any]]:
    """(id, messages or an error string) per non-empty line."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such input file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            items.append((f"line {n}", f"{path}:{n}: invalid JSON ({e.msg})"))
            continue
        if not isinstance(d, dict) or "id" not in d:
            items.append((f"line {n}", f"{path}:{n}: a line needs an \"id\" and \"messages\""))
        elif "messages" not in d:
            items.append((d["id"], f"{path}:{n}: no \"messages\""))
        else:
            items.append((d["id"], _relative_audio(d["messages"], path.parent)))
    return items


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import lalm

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    given = decoding_options(args)
    items = read_input(args.input)
    skip = done_ids(args.output)
    todo = [(i, m) for i, m in items if json.dumps(i) not in skip]
    if not todo:
        print(f"lalm generate: nothing to do ({len(items)} ids already in {args.output})", file=sys.stderr)
        return 0
    model = lalm.load(args.model, dtype=args.dtype, device=args.device)
    options = model.options(**given)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    with args.output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), unit="conv",
                                                              file=sys.stderr) as bar:
        if out.tell() and not args.output.read_bytes().endswith(b"\n"):
            out.write("\n")  # a line cut by an interruption stays on its own (and is redone)

        def write(d: dict) -> None:
            out.write(json.dumps(d, ensure_ascii=False) + "\n")

        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            ready = []  # (id, Example): prepared one by one so a bad line fails alone
            for id_, messages in chunk:
                if isinstance(messages, str):
                    write({"id": id_, "error": messages})
                    n_err += 1
                    continue
                try:
                    ready.append((id_, model.prepare(messages)))
                except LalmError as e:
                    write({"id": id_, "error": str(e)})
                    n_err += 1
            if ready:
                results = model.generate_examples([e for _, e in ready], options, args.batch_size)
                for (id_, _), r in zip(ready, results):
                    write({"id": id_, **r.to_dict()})
            out.flush()  # a finished batch survives an interruption
            bar.update(len(chunk))
    print(f"lalm generate: {len(todo) - n_err} generated, {n_err} errors, {len(items) - len(todo)} skipped "
          f"-> {args.output}", file=sys.stderr)
    return 0
