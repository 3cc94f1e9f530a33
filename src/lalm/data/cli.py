"""Build and inspect training corpora.

  lalm data build --out DIR [--size small|full] [--seed N] [--workers N]
      Build the offline multi-task corpus (pre-training, SFT, DPO, eval sets) from
      espeak-ng, flite, sonic-pi samples and synthesis; held-out sources go to DIR/eval only.
  lalm data check MANIFEST
      Read a manifest (ours, ms-swift/LLaMA-Factory style, or a LibriSpeech folder);
      report malformed lines and missing audio with their line numbers.
  lalm data stats MANIFEST
      Lines per task and source, and total audio duration.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the offline corpus")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--size", choices=("small", "full"), default="small")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, helptext in (("check", "validate a manifest"), ("stats", "summarise a manifest")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("manifest", help="JSONL manifest or LibriSpeech-layout folder")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        from lalm.data.build import build

        res = build(args.out, args.size, args.seed, args.workers, progress=not args.no_progress)
        train = sum(n for k, n in res.counts.items() if k.endswith("/train"))
        print(f"wrote {res.out}: {train} training examples, {res.n_clips} clips "
              f"({res.audio_seconds / 3600:.2f} h), {res.voices} voices, {res.seconds:.0f} s "
              f"(rendering: {res.render_cpu:.0f} CPU s)")
        for key, n in res.counts.items():
            print(f"  {key}.jsonl: {n}")
        return 0
    from lalm.data.manifest import read_manifest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = read_manifest(args.manifest)
    if args.action == "check":
        for n, msg in m.problems:
            print(f"line {n}: {msg}")
        print(f"{len(m)} records loaded, {len(m.problems)} skipped")
        return 1 if m.problems else 0
    # source, task and durations are optional and free-form on users' lines (null, a number,
    # a list...): summarise what is there, never stop on it
    tasks = Counter(str(r.get("task") or "?") for r in m)
    sources = Counter(p.partition(":")[0] for r in m for p in str(r.get("source") or "?").split(" + "))
    seconds = sum(_seconds(r) for r in m)
    print(f"{len(m)} records, {len(m.problems)} skipped, {seconds / 3600:.2f} h of audio")
    print("tasks:   " + ", ".join(f"{k} {v}" for k, v in tasks.most_common()))
    print("sources: " + ", ".join(f"{k} {v}" for k, v in sources.most_common()))
    return 0


def _seconds(record: dict) -> float:
    """Total of a record's `durations` values that are numbers (0 without any)."""
    d = record.get("durations")
    if not isinstance(d, dict):
        return 0.0
    return sum(v for v in d.values() if isinstance(v, (int, float)) and not isinstance(v, bool))
