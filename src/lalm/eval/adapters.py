"""Readers for the public benchmarks in their released layouts, and for lalm's own eval sets.

Each reader walks a local folder and returns `EvalItem`s with absolute audio paths, the
official base-model prompt, an Instruct variant and the reference. Source names follow the
official jsonl style (`librispeech_test_clean`, `cv15_en`, `fleurs_zh`, `aishell2_ios_test`,
`covost2_en_de_test`, `meld_test`, `vocalsound_test`; AIR-Bench chat uses its task names),
so scores group per source the way the official scripts group them.

Layouts read (the folder given may be the release root or anything above it):
- LibriSpeech: `<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` + `<utt>.flac`
- Common Voice: `cv-corpus-<N>-<date>/<locale>/<split>.tsv` (header `path`, `sentence`) + `clips/`
- FLEURS: `<lang_dir>/<split>.tsv` (no header: id, file name, raw transcription, ...) + `audio/<split>/`
- AISHELL-2 dev/test: `<Device>/<split>/wav.scp` (`ID relative/path.wav`) + `trans.txt` (`ID text`)
- CoVoST 2: `covost_v2.<src>_<tgt>.<split>.tsv` (`path`, `sentence`, `translation`) over the
  Common Voice `clips/` of the source language
- MELD: `<split>_sent_emo.csv` + `dia<D>_utt<U>.{wav,flac,mp3,mp4}` clips
- VocalSound: `<speaker>_<n>_<label>.wav` (the label is in the file name)
- AIR-Bench chat: `Chat_meta.json` + `<task_name>_<dataset_name>/<path>`
- the official eval jsonl (`{"audio", "prompt", "gt", "source"}`), and lalm manifests
  (`{"id", "source", "task", "messages", "reference", "lang"}`, audio relative to the file).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lalm.data.manifest import resolve_audio_path
from lalm.errors import AudioError, ConfigError
from lalm.eval import prompts

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".mp4")


@dataclass
class EvalItem:
    id: str
    source: str
    task: str  # asr | s2tt | ser | vsc | chat | lalm's own task names
    lang: str  # asr: spoken language; s2tt: target language
    audio: list[str]
    reference: str
    src_lang: str | None = None
    prompt: str | None = None  # base model: raw text after the audio placeholder
    instruction: str | None = None  # Instruct model: text beside the audio
    question: str | None = None  # chat: the user's question
    meta_info: str | None = None  # chat: the audio description the judge reads
    messages: list | None = None  # lalm manifests: the conversation as given
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.id)


def _item(task: str, id: str, source: str, lang: str, audio: Path, reference: str,
          src_lang: str | None = None) -> EvalItem:
    return EvalItem(
        id=id, source=source, task=task, lang=lang, audio=[str(audio.resolve())], reference=reference,
        src_lang=src_lang, prompt=prompts.base_prompt(task, lang, src_lang),
        instruction=prompts.instruct_prompt(task, lang, src_lang),
    )


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise AudioError(f"{path}: audio file missing ({what})")
    return path


def _find_audio(folder: Path, stem: str, what: str) -> Path:
    for ext in AUDIO_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise AudioError(f"{folder / stem}.*: audio file missing ({what})")


def _read_tsv(path: Path, header: bool = True) -> list[dict] | list[list[str]]:
    # Common Voice, CoVoST and FLEURS tsvs contain bare quotes: read them with quoting off.
    with open(path, encoding="utf-8", newline="") as f:
        if header:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _column(row: dict, name: str, path: Path, line: int) -> str:
    if row.get(name) is None:
        raise ConfigError(f"{path}:{line}: column {name!r} missing")
    return row[name]


# ----------------------------------------------------------------------------------------------
def librispeech(root: Path) -> list[EvalItem]:
    items = []
    for trans in sorted(root.rglob("*.trans.txt")):
        split = trans.parent.parent.parent.name  # <split>/<speaker>/<chapter>/x.trans.txt
        source = "librispeech_" + split.replace("-", "_").lower()
        for n, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            if not text:
                raise ConfigError(f"{trans}:{n}: expected 'ID TRANSCRIPT'")
            audio = _find_audio(trans.parent, utt, f"listed in {trans}:{n}")
            items.append(_item("asr", utt, source, "en", audio, text.strip()))
    return items


def _cv_lang(locale: str) -> str:
    return {"zh-CN": "zh", "zh-TW": "zh", "zh-HK": "yue"}.get(locale, locale.split("-")[0].lower())


def _cv_source(path: Path, lang: str) -> str:
    m = re.search(r"cv-corpus-(\d+)", str(path))
    return f"cv{m.group(1)}_{lang}" if m else f"cv_{lang}"


def commonvoice(root: Path, split: str = "test") -> list[EvalItem]:
    items = []
    for tsv in sorted(root.rglob(f"{split}.tsv")):
        if not (tsv.parent / "clips").is_dir():
            continue
        lang = _cv_lang(tsv.parent.name)
        source = _cv_source(tsv, lang)
        for n, row in enumerate(_read_tsv(tsv), 2):
            clip = _column(row, "path", tsv, n)
            audio = _need(tsv.parent / "clips" / clip, f"{tsv}:{n}")
            items.append(_item("asr", Path(clip).stem, source, lang, audio, _column(row, "sentence", tsv, n)))
    return items


_FLEURS_LANG = {"cmn": "zh", "yue": "yue"}


def fleurs(root: Path, split: str = "test") -> list[EvalItem]:
    items = []
    for tsv in sorted(root.rglob(f"{split}.tsv")):
        audio_dir = tsv.parent / "audio" / split
        if not audio_dir.is_dir():
            continue
        lang = _FLEURS_LANG.get(tsv.parent.name.split("_")[0], tsv.parent.name.split("_")[0])
        for n, row in enumerate(_read_tsv(tsv, header=False), 1):
            if len(row) < 3:
                raise ConfigError(f"{tsv}:{n}: expected id, file name, transcription columns")
            audio = _need(audio_dir / row[1], f"{tsv}:{n}")
            items.append(_item("asr", Path(row[1]).stem, f"fleurs_{lang}", lang, audio, row[2]))
    return items


def aishell2(root: Path) -> list[EvalItem]:
    items = []
    for scp in sorted(root.rglob("wav.scp")):
        trans_path = scp.parent / "trans.txt"
        if not trans_path.is_file():
            raise ConfigError(f"{scp}: no trans.txt beside it")
        texts = {}
        for line in trans_path.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.strip().partition(" ") if " " in line else line.strip().partition("\t")
            if utt:
                texts[utt] = text.strip()
        device = scp.parent.parent.name.lower()
        source = f"aishell2_{device}_{scp.parent.name.lower()}"
        for n, line in enumerate(scp.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"{scp}:{n}: expected 'ID PATH'")
            utt, rel = parts
            if utt not in texts:
                raise ConfigError(f"{scp}:{n}: {utt} has no transcript in {trans_path}")
            audio = _need(scp.parent / rel, f"{scp}:{n}")
            items.append(_item("asr", utt, source, "zh", audio, texts[utt]))
    return items


def _covost_clips(root: Path, tsv: Path, src: str) -> Path:
    candidates = [tsv.parent / "clips", root / src / "clips", root / "clips"]
    candidates += [p for p in sorted(root.rglob("clips")) if _cv_lang(p.parent.name) == src]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConfigError(f"{tsv}: no Common Voice clips/ folder for language {src!r} under {root}")


def covost2(root: Path, split: str = "test") -> list[EvalItem]:
    items = []
    for tsv in sorted(root.rglob(f"covost_v2.*_*.{split}.tsv")):
        src, tgt = tsv.name.split(".")[1].split("_")
        clips = _covost_clips(root, tsv, src)
        source = f"covost2_{src}_{tgt}_{split}"
        for n, row in enumerate(_read_tsv(tsv), 2):
            clip = _column(row, "path", tsv, n)
            audio = _need(clips / clip, f"{tsv}:{n}")
            ref = _column(row, "translation", tsv, n)
            items.append(_item("s2tt", Path(clip).stem, source, tgt, audio, ref, src_lang=src))
    return items


def meld(root: Path, split: str = "test") -> list[EvalItem]:
    items = []
    for csv_path in sorted(root.rglob(f"{split}_sent_emo.csv")):
        stems = {}
        for p in csv_path.parent.rglob("dia*_utt*.*"):
            if p.suffix.lower() in AUDIO_EXTS:
                # Prefer an extracted audio file over the released mp4 video of the same clip.
                old = stems.get(p.stem)
                if old is None or AUDIO_EXTS.index(p.suffix.lower()) < AUDIO_EXTS.index(old.suffix.lower()):
                    stems[p.stem] = p
        with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
            rows = list(csv.DictReader(f))
        for n, row in enumerate(rows, 2):
            stem = f"dia{_column(row, 'Dialogue_ID', csv_path, n)}_utt{_column(row, 'Utterance_ID', csv_path, n)}"
            if stem not in stems:
                raise AudioError(f"{csv_path}:{n}: clip {stem} not found under {csv_path.parent}")
            emotion = _column(row, "Emotion", csv_path, n).strip().lower()
            items.append(_item("ser", stem, f"meld_{split}", "en", stems[stem], emotion))
    return items


_VOCALSOUND_NAME = re.compile(r"^(.+)_(laughter|sigh|cough|throatclearing|sneeze|sniff)$")
_VOCALSOUND_LABEL = dict(zip(["laughter", "sigh", "cough", "throatclearing", "sneeze", "sniff"],
                             prompts.VOCALSOUND_LABELS, strict=True))


def vocalsound(root: Path, split: str = "test") -> list[EvalItem]:
    items = []
    for path in sorted(root.rglob("*.wav")):
        m = _VOCALSOUND_NAME.match(path.stem)
        if m:
            label = _VOCALSOUND_LABEL[m.group(2)]
            items.append(_item("vsc", path.stem, f"vocalsound_{split}", "en", path, label))
    return items


def airbench_chat(root: Path) -> list[EvalItem]:
    items = []
    for meta_path in sorted(root.rglob("Chat_meta.json")):
        try:
            rows = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{meta_path}: not valid JSON ({e})") from e
        for n, row in enumerate(rows):
            for key in ("task_name", "dataset_name", "path", "question", "answer_gt"):
                if key not in row:
                    raise ConfigError(f"{meta_path}: entry {n} has no {key!r}")
            audio = _need(meta_path.parent / f"{row['task_name']}_{row['dataset_name']}" / row["path"],
                          f"{meta_path} entry {n}")
            items.append(EvalItem(
                id=str(row.get("uniq_id", n)), source=row["task_name"], task="chat", lang="en",
                audio=[str(audio.resolve())], reference=row["answer_gt"], question=row["question"],
                instruction=row["question"], meta_info=row.get("meta_info", ""),
                extra={"dataset_name": row["dataset_name"]},
            ))
    return items


# ----------------------------------------------------------------------------------------------
_OFFICIAL_TASK_DIRS = {"asr": "asr", "st": "s2tt", "ser": "ser", "vsc": "vsc", "chat": "chat"}
_LANG_TAG = re.compile(r"<\|([a-z]{2,3})\|>\s*$")


def _source_lang(source: str) -> str:
    """A source's language where the prompt carries no <|xx|> tag: the official evaluate_asr.py
    takes it per dataset (ds_collections: aishell2 zh, cv15_zh zh, cv15_yue yue, fluers_zh zh,
    ...), and it decides whether WER counts words or characters."""
    parts = source.lower().split("_")
    if parts[0].startswith("aishell"):
        return "zh"
    return next((p for p in reversed(parts) if p in ("zh", "yue", "en", "fr")), "en")


def official_jsonl(path: Path, task: str | None = None) -> list[EvalItem]:
    """The official eval files: `{"audio", "prompt", "gt", "source"}` per line."""
    task = task or _OFFICIAL_TASK_DIRS.get(path.parent.name)
    if task is None:
        raise ConfigError(f"{path}: cannot tell the task from the folder name; pass --task")
    items = []
    for n, row in _jsonl(path):
        for key in ("audio", "prompt", "gt", "source"):
            if key not in row:
                raise ConfigError(f"{path}:{n}: field {key!r} missing")
        src_lang = None
        if task == "s2tt":
            lang = row["source"].split("_")[-2]
            src_lang = row["source"].split("_")[-3] if len(row["source"].split("_")) >= 3 else None
        else:
            m = _LANG_TAG.search(row["prompt"])
            lang = row.get("lang") or (m.group(1) if m else _source_lang(row["source"]))
        audio = Path(row["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        items.append(EvalItem(
            id=str(row.get("id", n)), source=row["source"], task=task, lang=lang,
            audio=[str(audio)], reference=row["gt"], src_lang=src_lang, prompt=row["prompt"],
            instruction=prompts.instruct_prompt(task, lang, src_lang) if task != "chat" else row["prompt"],
        ))
    return items


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object")
            yield n, row


def _resolve_audio(messages: list, base: Path) -> list[str]:
    """Make audio paths absolute and list them.

    Manifests store paths relative to the file; a path that only exists relative to the
    folder above (the corpus root, for DIR/eval/*.jsonl written with DIR-relative paths) is
    taken from there.
    """
    found = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "audio":
                key = "audio" if "audio" in part else "audio_url"
                value = part.get(key)
                if isinstance(value, str) and not Path(value).is_absolute() and "://" not in value:
                    part[key] = str(resolve_audio_path(value, base))
                if isinstance(part.get(key), str):
                    found.append(part[key])
    return found


def manifest(path: Path) -> list[EvalItem]:
    """lalm's eval manifests: the conversation to answer plus `reference` (or a final assistant turn).

    The item's source is the set's name (the file stem), so a report has one row per eval set;
    a line's optional `subset` (the kind of sentence or question) is scored apart as well.
    """
    items = []
    for n, row in _jsonl(path):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{path}:{n}: field 'messages' missing or empty")
        reference = row.get("reference")
        if messages[-1].get("role") == "assistant":
            last = messages[-1]["content"]
            messages = messages[:-1]
            if reference is None:
                reference = last if isinstance(last, str) else "".join(
                    p.get("text", "") for p in last if isinstance(p, dict))
        if reference is None:
            raise ConfigError(f"{path}:{n}: no 'reference' and no final assistant turn")
        audio = _resolve_audio(messages, path.parent)
        # Scores group by eval set (the file), not by the line's provenance ("sonic-pi:bd_zum.flac"
        # would make one group per recording); the provenance stays in extra["origin"].
        items.append(EvalItem(
            id=str(row.get("id", n)), source=path.stem,
            task=str(row.get("task", path.stem)), lang=str(row.get("lang") or "en"), audio=audio,
            reference=str(reference), messages=messages, question=row.get("question"),
            extra={"origin": str(row.get("source", ""))} | ({"subset": str(row["subset"])} if row.get("subset") else {}),
        ))
    return items


# ----------------------------------------------------------------------------------------------
BENCHMARKS = {
    "librispeech": librispeech, "commonvoice": commonvoice, "fleurs": fleurs, "aishell2": aishell2,
    "covost2": covost2, "meld": meld, "vocalsound": vocalsound, "airbench": airbench_chat,
}


def detect(path: Path) -> str:
    """Name the layout of a folder (or file) from its tell-tale files."""
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(f"{path}: expected a .jsonl file or a benchmark folder")
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        try:
            row = json.loads(first)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:1: not valid JSON ({e.msg})") from e
        return "official" if {"audio", "gt", "prompt"} <= set(row) else "manifest"
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    probes = [
        ("airbench", "Chat_meta.json"), ("covost2", "covost_v2.*.tsv"), ("librispeech", "*.trans.txt"),
        ("aishell2", "wav.scp"), ("meld", "*_sent_emo.csv"),
    ]
    for name, pattern in probes:
        if next(path.rglob(pattern), None) is not None:
            return name
    for tsv in path.rglob("*.tsv"):
        if (tsv.parent / "clips").is_dir():
            return "commonvoice"
        if (tsv.parent / "audio").is_dir():
            return "fleurs"
    if any(_VOCALSOUND_NAME.match(p.stem) for p in path.rglob("*.wav")):
        return "vocalsound"
    if next(path.glob("*.jsonl"), None) is not None:
        return "manifests"
    raise ConfigError(f"{path}: no known benchmark layout found (see `lalm eval --help`)")


def load(path: str | Path, benchmark: str | None = None, task: str | None = None,
         limit: int | None = None) -> list[EvalItem]:
    """Every item under `path`, in a stable order; `limit` keeps the first N per source."""
    path = Path(path)
    name = benchmark or detect(path)
    if name == "official":
        items = official_jsonl(path, None if task in (None, "auto") else task)
    elif name == "manifest":
        items = manifest(path)
    elif name == "manifests":
        # An official file's task comes from --task where its folder does not name one (asr/, st/...);
        # a lalm manifest's lines name theirs, and --task filters them below.
        items = [it for f in sorted(path.glob("*.jsonl"))
                 for it in (official_jsonl(f, None if task in (None, "auto") else task)
                            if detect(f) == "official" else load(f, limit=None))]
    elif name in BENCHMARKS:
        items = BENCHMARKS[name](path)
    else:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    if not items:
        raise ConfigError(f"{path}: no {name} items found")
    if task not in (None, "auto"):
        items = [it for it in items if it.task == task]
        if not items:
            raise ConfigError(f"{path}: no items of task {task!r}")
    if limit is not None:
        kept, seen = [], {}
        for it in items:
            if seen.get(it.source, 0) < limit:
                seen[it.source] = seen.get(it.source, 0) + 1
                kept.append(it)
        items = kept
    return items
