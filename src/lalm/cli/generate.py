"""Batch generation over a JSONL file, restartable.

  lalm generate --model PATH --input in.jsonl --output out.jsonl [--batch-size 8]
                [--max-new-tokens N] [--temperature T]

Each input line is {"id": ..., "messages": [...]} (a unique id; audio paths relative to the
input file); each output line is {"id", "text", "token_ids", "logprobs", "prompt_tokens",
"audio_tokens", "finish_reason"}. Ids already answered in the output are skipped, so an
interrupted run picks up where it stopped. A bad line (invalid JSON, a missing field, an
unreadable audio, a prompt longer than the context) gets {"id", "error"} and the run goes on;
a rerun tries those ids again.
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


def _lines(data: bytes) -> list[bytes]:
    """JSONL lines, split on b"\n" only: str.splitlines also splits at U+2028, U+0085 and the
    like, which json.dumps(ensure_ascii=False) leaves raw inside strings, so a valid line (a
    generated text containing one) would come apart. Bytes, so a line a kill cut inside a
    multi-byte character fails alone instead of the whole file failing to decode."""
    return data.split(b"\n")


def done_ids(output: Path) -> set[str]:
    """Ids already answered (complete lines only: a line cut by a crash is redone). Error lines
    are removed from `output` first: their ids are tried again (the audio may be fixed by now),
    and the file keeps one line per id. So is a last line a kill cut off (no newline, not JSON):
    the id is redone, and the file stays one JSON object per line."""
    ids: set[str] = set()
    if not output.exists():
        return ids
    lines = _lines(output.read_bytes())
    kept = []
    for n, line in enumerate(lines):
        if n == len(lines) - 1 and not line:  # after the final newline
            continue
        try:
            rec = json.loads(line)
            if "error" in rec:
                continue
            ids.add(json.dumps(rec["id"]))
        except ValueError:  # bad JSON or a cut UTF-8 sequence
            if n == len(lines) - 1:
                continue  # torn by an interruption
        except (KeyError, TypeError):
            pass
        kept.append(line + b"\n")
    if b"".join(kept) != b"\n".join(lines):
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        tmp.replace(output)  # atomic: a kill here leaves the old file or the new, never half
    return ids


def read_input(path: Path) -> list[tuple[Any, Any]]:
    """(id, messages or an error string) per non-empty line. An id given twice is refused: the
    output has one line per id, and a rerun could not tell which of the two was answered."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such input file")
    items = []
    first_line: dict[str, int] = {}
    for n, raw in enumerate(_lines(path.read_bytes()), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append((f"line {n}", f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            items.append((f"line {n}", f"{path}:{n}: invalid JSON ({e.msg})"))
            continue
        if not isinstance(d, dict) or "id" not in d:
            items.append((f"line {n}", f"{path}:{n}: a line needs an \"id\" and \"messages\""))
            continue
        key = json.dumps(d["id"])
        if key in first_line:
            raise ConfigError(f"{path}:{n}: id {key} is also on line {first_line[key]}; "
                              "ids must be unique (each names one output line)")
        first_line[key] = n
        if "messages" not in d:
            items.append((d["id"], f"{path}:{n}: no \"messages\""))
        else:
            items.append((d["id"], _relative_audio(d["messages"], path.parent)))
    return items


def _check_output(output: Path) -> None:
    """Refuse an output that cannot be written before the model loads (minutes for a 7B),
    not after; the folder is made here. A probe file that was not there is removed again."""
    existed = output.exists()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.open("ab").close()
        if not existed:
            output.unlink()
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write there ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import lalm

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    given = decoding_options(args)
    try:
        items = read_input(args.input)
    except OSError as e:
        raise ConfigError(f"--input {args.input}: cannot read it ({e.strerror or e})") from None
    _check_output(args.output)
    skip = done_ids(args.output)
    todo = [(i, m) for i, m in items if json.dumps(i) not in skip]
    if not todo:
        print(f"lalm generate: nothing to do ({len(items)} ids already in {args.output})", file=sys.stderr)
        return 0
    model = lalm.load(args.model, dtype=args.dtype, device=args.device)
    options = model.options(**given)
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
