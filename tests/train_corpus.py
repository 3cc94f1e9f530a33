"""What the trainer tests share: tiny hermetic manifests (synthetic audio written to tmp), the
test configs, the one-thread setting and the environment of `python -m lalm` subprocesses.

Each "word" is a distinct tone (its own frequency and a second harmonic) so the audio alone
tells which transcript is right: a model can only get the answers by listening.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lalm.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses (`python -m lalm train`, torchrun) run the source tree with one thread, so their
# arithmetic is the same as the in-process runs they are compared with.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}



@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to use: one torch thread there (same arithmetic as the
    subprocesses; on a shared 2-core machine default threads spin against each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(stage: str, data: Path, out: Path, *overrides: str) -> TrainConfig:
    """configs/test/<stage>.yaml on a manifest, writing to out, without progress bars."""
    return TrainConfig.load(ROOT / f"configs/test/{stage}.yaml",
                            [f"data={data}", f"out={out}", "progress=false", *overrides]).validate()


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
PROMPT = "Transcribe this audio."


def tone(k: int, seconds: float = 0.4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 * k + seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f = 250.0 * (1.3 ** k)
    wave = 0.4 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 2.7 * f * t)
    return (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_audio(folder: Path, k: int, seed: int = 0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tone-{k}-{seed}.wav"
    if not path.exists():
        sf.write(path, tone(k, seed=seed), 16000)
    return path.name


def asr_record(folder: Path, k: int, seed: int = 0, prompt: str = PROMPT) -> dict:
    return {"id": f"asr-{k}-{seed}", "source": "synth:tone", "task": "asr",
            "messages": [{"role": "user", "content": [{"type": "audio", "audio": write_audio(folder, k, seed)},
                                                      {"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": WORDS[k]}]}


def dpo_record(folder: Path, k: int, seed: int = 0) -> dict:
    rec = asr_record(folder, k, seed)
    rec["messages"] = rec["messages"][:1]
    rec["chosen"] = WORDS[k]
    rec["rejected"] = WORDS[(k + 1) % len(WORDS)]
    return rec


def corrupt_flac(folder: Path) -> str:
    """A FLAC whose header reads (sf.info: 1 s) but whose body does not decode: it passes the
    manifest's header check and fails only when a step, an eval or the DPO reference loads it."""
    sf.write(folder / "corrupt.flac", (0.3 * np.sin(np.arange(16000) * 0.1)).astype(np.float32), 16000)
    body = bytearray((folder / "corrupt.flac").read_bytes())
    body[200:] = bytes((7 * i) % 256 for i in range(200, len(body)))
    (folder / "corrupt.flac").write_bytes(body)
    return "corrupt.flac"


def write_manifest(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def asr_manifest(folder: Path, n: int = 8, seeds=(0,)) -> Path:
    return write_manifest(folder / "asr.jsonl", [asr_record(folder, k, s) for s in seeds for k in range(n)])
