"""Manifests: the JSONL files every training and evaluation command reads.

One example a line, UTF-8 (a leading BOM is ignored). Audio paths are relative to the manifest
file (absolute paths are accepted too): `lalm data build` writes `DIR/sft/train.jsonl` with
`../audio/...`. `read_manifest` resolves them to absolute paths, so callers can hand
`record["messages"]` straight to `chat.validate` / `processor.prepare`.

Pre-training and SFT lines::

    {"id": "asr-000123", "source": "espeak-ng:en-gb-scotland+m3", "task": "asr",
     "messages": [
        {"role": "user", "content": [{"type": "audio", "audio": "../audio/asr/000123.wav"},
                                     {"type": "text", "text": "Transcribe this audio."}]},
        {"role": "assistant", "content": "the cat sat on the mat"}],
     "durations": {"../audio/asr/000123.wav": 1.84},
     "meta": {"voice": "en-gb-scotland+m3", "rate": 160, "pitch": 50}}

- `messages`: the chat format of docs/design.md (roles system/user/assistant; content a
  string or a list of parts `{"type": "text", "text"}` / `{"type": "audio", "audio"}`).
  Voice chat is a user turn that holds only audio. Several audios may share a turn.
- `source`: where the audio came from, `engine:voice` (espeak-ng, flite, piper), or
  `package:file` (sonic-pi, pocketsphinx-testdata, alsa-utils), or `synth:<kind>`.
  Several sources are joined with `+`. Held-out sources never appear in training files.
- `task`: asr, lid, s2tt, speaker, sound, music, mixed, turns, coarse, voice_chat, multi_audio.
- `durations` (optional): seconds of each audio file, keyed by the path as written.
- `meta` (optional): free-form labels (voice, rate, pitch, snr_db, ...), never read by training.
- `format` (optional, pre-training only): "raw" (default: the base model's prompt form) or
  "chat" (rendered in the Instruct template, as SFT renders every line).

Preference (DPO) lines: `messages` holds the prompt turns only (ending with a user turn),
plus `"chosen": "..."` (the correct answer) and `"rejected": "..."` (a wrong or hedging one).

Evaluation lines (`DIR/eval/<name>.jsonl`): `messages` holds the prompt turns only, plus
`"reference"`: the exact expected answer, and `"lang"` (e.g. "en") where the task has one;
voice-chat lines also carry `"question"`, the spoken question as text, and lalm's own sets a
`"subset"` (asr_piper: the kind of sentence, e.g. "wordlist"; voice_chat_piper: the kind of
question; asr_real: librivox, cards, goforward, alsa-utils), which `lalm eval` scores apart
beside the whole set. Scorers normalise
both sides (ASR: WER; voice chat / coarse / sound: exact match). Eval sets written by
`lalm data build`: asr_piper, voice_chat_piper, asr_real, sound, coarse.

Also read, per line, so users can bring data they already have:
- ms-swift / LLaMA-Factory: `messages` (role/content) or `conversations` (from/value) or
  `query`/`response`/`history`, with `<audio>` placeholders in the text and `"audios": [...]`
  (or `"audio"`; null = none) and an optional top-level `"system"`; `"rejected_response"`
  (ms-swift) or `"chosen"`/`"rejected"` (LLaMA-Factory: strings, or messages with
  `value` or `content`) make a DPO record. lalm's own optional fields (`format`, `meta`, and
  the eval fields) keep their meaning on these lines.
- A LibriSpeech-layout folder (`speaker/chapter/*.flac` + `speaker-chapter.trans.txt`):
  `read_librispeech(dir)`, or `read_manifest(dir)`.

A malformed line is reported with its line number and skipped (a counted warning); so is a
line that is not UTF-8, one that the chat format refuses (`chat.validate`, as every training
stage does), and one whose audio file is missing. The rest loads.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from lalm import chat
from lalm.errors import ChatFormatError, LalmError

ROLES = ("system", "user", "assistant")
AUDIO_TAG = "<audio>"
# Both spellings of the placeholder appear in the wild (ms-swift writes <audio>).
_AUDIO_TAG_RE = re.compile(r"<audio>|<\|AUDIO\|>")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system", "observation": "user"}


class Manifest(list):
    """The records of one manifest, plus what was skipped and why.

    `problems` holds `(line_number, message)` for every skipped line (1-based).
    """

    def __init__(self, records=(), problems=(), path: str = ""):
        super().__init__(records)
        self.problems: list[tuple[int, str]] = list(problems)
        self.path = path


def audio_paths(record: dict) -> list[str]:
    """Every audio path of a record, in order of appearance."""
    out = []
    for m in record.get("messages", []):
        content = m.get("content")
        if isinstance(content, list):
            out += [p["audio"] for p in content if isinstance(p, dict) and p.get("type") == "audio"]
    return out


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatFormatError(f"{where}: message {i} needs a role in {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise ChatFormatError(f"{where}: message {i} content must be a string or a list of parts")
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                continue
            if kind == "audio" and isinstance(p.get("audio"), str) and p["audio"]:
                continue
            raise ChatFormatError(f"{where}: message {i} part {j} must be a text or audio part")


def _split_audio_tags(text: str, audios: list[str], where: str) -> list[dict] | str:
    """'<audio>What is this?' + ['a.wav'] -> [audio part, text part]; consumes `audios`."""
    pieces = _AUDIO_TAG_RE.split(text)
    if len(pieces) == 1:
        return text
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            if not audios:
                raise ChatFormatError(f"{where}: more <audio> tags than entries in 'audios'")
            parts.append({"type": "audio", "audio": audios.pop(0)})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip("\n")})
    return parts


def _answer(value: Any, key: str, where: str) -> Any:
    """A DPO answer: a string, or a message dict (LLaMA-Factory writes {"from", "value"}, or
    {"role", "content"} with OpenAI-style tags)."""
    if not isinstance(value, dict):
        return value
    for k in ("value", "content"):
        if k in value:
            return value[k]
    raise ChatFormatError(f"{where}: '{key}' is a message without 'value' or 'content'")


def _list_of_dicts(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ChatFormatError(f"{where}: '{key}' must be a list of message objects")
    return value


def _from_swift(obj: dict, where: str) -> dict:
    """Convert one ms-swift / LLaMA-Factory line to our record (see module docstring).

    Any malformed field raises ChatFormatError (never TypeError/KeyError), so the reader can
    skip the line and name it instead of stopping on it.
    """
    audios = obj.get("audios", obj.get("audio"))
    if audios is None:  # exports of mixed datasets write null for a text-only row
        audios = []
    elif isinstance(audios, str):
        audios = [audios]
    elif isinstance(audios, list) and all(isinstance(a, str) for a in audios):
        audios = list(audios)
    else:
        raise ChatFormatError(f"{where}: 'audios' must be a path or a list of paths")
    if "conversations" in obj:  # ShareGPT (LLaMA-Factory)
        turns = []
        for m in _list_of_dicts(obj["conversations"], "conversations", where):
            speaker = m.get("from", m.get("role"))
            role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise ChatFormatError(f"{where}: unknown speaker {m.get('from')!r}")
            turns.append({"role": role, "content": m.get("value", m.get("content", ""))})
        if obj.get("system"):
            turns.insert(0, {"role": "system", "content": obj["system"]})
    elif "messages" in obj:
        turns = [dict(m) for m in _list_of_dicts(obj["messages"], "messages", where)]
        # a separate "system" column (LLaMA-Factory's OpenAI-style tags) is the first turn,
        # as in the other two layouts, unless the messages already open with one
        if obj.get("system") and not (turns and turns[0].get("role") == "system"):
            turns.insert(0, {"role": "system", "content": obj["system"]})
    elif "query" in obj:  # old ms-swift: query/response/history
        turns = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise ChatFormatError(f"{where}: 'history' must be a list of [query, response] pairs")
        for q, r in history:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        turns.append({"role": "user", "content": obj["query"]})
        if "response" in obj:
            turns.append({"role": "assistant", "content": obj["response"]})
    else:
        raise ChatFormatError(f"{where}: no 'messages', 'conversations' or 'query'")
    for m in turns:
        if isinstance(m.get("content"), str):
            m["content"] = _split_audio_tags(m["content"], audios, where)
    if audios:
        raise ChatFormatError(f"{where}: {len(audios)} entries in 'audios' have no <audio> tag")
    # our own optional fields (see the module docstring) mean the same on these lines
    rec = {k: obj[k] for k in ("id", "source", "task", "format", "reference", "lang", "question",
                               "subset", "meta") if k in obj}
    chosen, rejected = obj.get("chosen"), obj.get("rejected", obj.get("rejected_response"))
    if rejected is not None:
        if chosen is None:  # ms-swift: the last assistant turn is the chosen answer
            if not turns or turns[-1].get("role") != "assistant":
                raise ChatFormatError(f"{where}: 'rejected_response' without an assistant answer")
            chosen = turns.pop()["content"]
        rec["chosen"] = _answer(chosen, "chosen", where)
        rec["rejected"] = _answer(rejected, "rejected", where)
    rec["messages"] = turns
    return rec


def _is_ours(obj: dict) -> bool:
    if "messages" not in obj or "audios" in obj or "audio" in obj:
        return False
    if not isinstance(obj["messages"], list):
        return True  # malformed either way: _check_messages names the problem
    return not any(isinstance(m, dict) and isinstance(m.get("content"), str)
                   and _AUDIO_TAG_RE.search(m["content"]) for m in obj["messages"])


def parse_line(line: str, where: str) -> dict:
    """One JSONL line (ours or ms-swift style) -> our record. Raises LalmError naming `where`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ChatFormatError(f"{where}: a line must be a JSON object")
    rec = obj if _is_ours(obj) else _from_swift(obj, where)
    for key in ("chosen", "rejected"):  # text-only LLaMA-Factory lines take this path too
        if isinstance(rec.get(key), dict):
            rec[key] = _answer(rec[key], key, where)
    _check_messages(rec["messages"], where)
    try:  # what every stage applies: a line `lalm data check` passes must not fail there
        chat.validate(rec["messages"])
    except ChatFormatError as e:
        raise ChatFormatError(f"{where}: {e}") from None
    for key in ("chosen", "rejected", "reference"):
        if key in rec and not isinstance(rec[key], str):
            raise ChatFormatError(f"{where}: '{key}' must be a string")
    if ("chosen" in rec) != ("rejected" in rec):
        raise ChatFormatError(f"{where}: 'chosen' and 'rejected' go together")
    if "chosen" in rec and rec["messages"][-1]["role"] != "user":
        # the trainer appends each answer to the prompt: a prompt ending in an answer would
        # train on two assistant turns in a row
        raise ChatFormatError(f"{where}: a DPO line's 'messages' are the prompt only and must "
                              f"end with a user turn, not {rec['messages'][-1]['role']!r}")
    return rec


def _resolve(rec: dict, base: Path) -> list[str]:
    """Make audio paths absolute (in place); return the ones that do not exist."""
    missing = []
    durations = rec.get("durations")
    for m in rec["messages"]:
        if not isinstance(m["content"], list):
            continue
        for p in m["content"]:
            if p["type"] != "audio":
                continue
            rel = p["audio"]
            # normpath, not resolve(): "../audio/x.wav" collapses, symlinks stay as given
            path = Path(rel) if Path(rel).is_absolute() else Path(os.path.normpath(base / rel))
            p["audio"] = str(path)
            if isinstance(durations, dict) and rel in durations:
                durations[str(path)] = durations.pop(rel)
            if not path.is_file():
                missing.append(rel)
    return missing


def read_manifest(path: str | Path, *, resolve_audio: bool = True, check_audio: bool = True,
                  warn: bool = True) -> Manifest:
    """Read a JSONL manifest (ours or ms-swift style) or a LibriSpeech folder.

    Malformed lines and lines whose audio is missing are skipped and recorded in
    `Manifest.problems` as `(line_number, message)`; one warning sums them up.
    """
    path = Path(path)
    if path.is_dir():
        return read_librispeech(path)
    if not path.is_file():
        raise LalmError(f"{path}: manifest not found")
    # absolute (not resolve(): symlinks stay as given), so records do not depend on the cwd
    base = path.parent.absolute()
    out = Manifest(path=str(path))
    # utf-8-sig: a BOM some editors write is not part of line 1; surrogateescape: a line in
    # another encoding is reported and skipped below instead of stopping the whole read
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                out.problems.append((n, f"{where}: not UTF-8 text (bad byte at column {e.start + 1})"))
                continue
            try:
                rec = parse_line(line, where)
            except LalmError as e:
                out.problems.append((n, str(e)))
                continue
            if resolve_audio:
                missing = _resolve(rec, base)
                if missing and check_audio:
                    out.problems.append((n, f"{where}: audio file not found: {missing[0]}"))
                    continue
            out.append(rec)
    if out.problems and warn:
        first = out.problems[0][1]
        warnings.warn(f"{path}: skipped {len(out.problems)} line(s); first: {first}", stacklevel=2)
    return out


def resolve_audio_path(value: str, base: Path) -> Path:
    """An audio path as written in a manifest in folder `base`, made absolute and resolved: relative
    to `base`, or to the folder above when only that exists (a corpus's DIR/eval/*.jsonl may hold
    DIR-relative paths)."""
    a = Path(value)
    if not a.is_absolute():
        here, above = base / a, base.parent / a
        a = above if not here.exists() and above.exists() else here
    return a.resolve()


def load_records(path: str | Path) -> list[dict]:
    """A manifest's records with absolute (resolved) audio paths, silently without those whose
    audio is missing: what the demo's data selection and reports read.

    Relative paths are taken relative to the manifest's folder, or, when only that exists, to
    the folder above it (the rule eval/adapters.py applies to DIR/eval/*.jsonl too).
    """
    path = Path(path)
    out = []
    for rec in read_manifest(path, resolve_audio=False, warn=False):
        ok = True
        for m in rec["messages"]:
            if not isinstance(m["content"], list):
                continue
            for part in m["content"]:
                if part.get("type") != "audio" or not isinstance(part.get("audio"), str):
                    continue
                a = resolve_audio_path(part["audio"], path.parent)
                part["audio"] = str(a)
                ok = ok and a.is_file()
        if ok:
            out.append(rec)
    return out


def read_librispeech(folder: str | Path, prompt: str = "Transcribe this audio.") -> Manifest:
    """A LibriSpeech-layout folder -> ASR records (transcripts lower-cased, as in our corpus).

    Layout: `<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` with one
    `<speaker>-<chapter>.trans.txt` per chapter holding `<utt-id> TRANSCRIPT` lines.
    """
    folder = Path(folder).absolute()  # absolute audio paths, as read_manifest gives
    out = Manifest(path=str(folder))
    trans_files = sorted(folder.rglob("*.trans.txt"))
    if not trans_files:
        raise LalmError(f"{folder}: no *.trans.txt files (LibriSpeech layout expected)")
    for tf in trans_files:
        for n, line in enumerate(tf.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            audio = next((tf.parent / f"{utt}{ext}" for ext in (".flac", ".wav")
                          if (tf.parent / f"{utt}{ext}").is_file()), None)
            if not text or audio is None:
                why = "no transcript" if not text else f"audio file not found: {utt}.flac"
                out.problems.append((n, f"{tf}:{n}: {why}"))
                continue
            out.append({
                "id": utt, "source": f"librispeech:{utt}", "task": "asr",
                "messages": [
                    {"role": "user", "content": [{"type": "audio", "audio": str(audio)},
                                                 {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": text.lower()}],
            })
    if out.problems:
        warnings.warn(f"{folder}: skipped {len(out.problems)} utterance(s); "
                      f"first: {out.problems[0][1]}", stacklevel=2)
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one a line, keys in insertion order, so equal input gives equal bytes.

    Written beside the target and renamed into place: a write stopped half-way never leaves a
    truncated manifest that reads as a shorter, valid one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
