"""`lalm data build`: layout, held-out rule, audio integrity, determinism (on --size small).

Run: .venv/bin/pytest -q tests/test_data_build.py        (about a minute: two small builds)
     .venv/bin/pytest -q -m slow tests/test_data_build.py  (the full corpus, minutes)
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from lalm.data import prompts
from lalm.data.build import HeldOutSourceError, build, check_training
from lalm.data.evalsets import is_held_out
from lalm.data.manifest import audio_paths, read_manifest
from lalm.data.tasks import Clip

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")),
                                reason="needs Debian espeak-ng and flite (make setup)")
TRAIN = [f"{s}/{p}" for s in ("pretrain", "sft", "dpo") for p in ("train", "dev")]
EVAL = ["asr_piper", "voice_chat_piper", "asr_real", "sound", "coarse"]
TASKS = {"asr", "lid", "s2tt", "speaker", "sound", "music", "mixed", "turns", "coarse",
         "voice_chat", "multi_audio"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    build(out, "small", seed=0, workers=2, progress=False)
    return out


def _lines(out: Path, key: str) -> list[dict]:
    """Records with absolute audio paths; every audio must exist (relative to the manifest)."""
    m = read_manifest(out / f"{key}.jsonl")
    assert m.problems == []
    return list(m)


def test_layout_and_all_tasks(small):
    for key in TRAIN + [f"eval/{n}" for n in EVAL]:
        assert (small / f"{key}.jsonl").is_file(), key
    assert "| asr |" in (small / "README.md").read_text()
    tasks = {r["task"] for key in TRAIN for r in _lines(small, key)}
    assert tasks == TASKS
    for r in _lines(small, "dpo/train"):
        assert r["messages"][-1]["role"] == "user" and r["chosen"] != r["rejected"]


def test_canonical_instructions_and_voice_chat_turns(small):
    texts, audio_only_turn = set(), False
    for key in ("pretrain/train", "sft/train"):
        for r in _lines(small, key):
            for m in r["messages"]:
                if m["role"] == "user" and isinstance(m["content"], list):
                    texts |= {p["text"] for p in m["content"] if p["type"] == "text"}
                    audio_only_turn |= all(p["type"] == "audio" for p in m["content"])
    assert {prompts.ASR_CANONICAL, prompts.COARSE_CANONICAL, prompts.SOUND_CANONICAL} <= texts
    assert audio_only_turn


def test_no_held_out_source_in_any_training_manifest(small):
    for key in TRAIN:
        for r in _lines(small, key):
            assert not is_held_out(r["source"]), (key, r["id"], r["source"])
            assert not any("/audio/eval/" in p for p in audio_paths(r)), (key, r["id"])
    # ... and the eval sets really come from the held-out sources
    for name in ("asr_piper", "voice_chat_piper", "asr_real", "sound"):
        assert all(is_held_out(r["source"]) for r in _lines(small, f"eval/{name}")), name


def test_builder_refuses_held_out_sources():
    piper = Clip("asr/0", {"kind": "tts", "engine": "piper", "voice": "en_US-joe-medium"}, "x:y")
    with pytest.raises(HeldOutSourceError, match="Piper"):
        check_training([piper], {})
    nested = Clip("mixed/0", {"kind": "mix", "fg": {"kind": "tts", "engine": "espeak-ng"},
                              "bg": {"kind": "sample", "path": "/usr/share/sonic-pi/samples/vinyl_hiss.flac"}},
                  "espeak-ng:en-us")
    with pytest.raises(HeldOutSourceError, match="vinyl_hiss"):
        check_training([nested], {})
    rec = {"source": "espeak-ng:en-us + alsa-utils:Front_Left.wav", "messages": []}
    with pytest.raises(HeldOutSourceError, match="sft/train line 1"):
        check_training([], {"sft/train": [rec]})


def test_every_audio_decodes_16k_mono_and_lasts_what_the_manifest_says(small):
    seen = set()
    for key in TRAIN + [f"eval/{n}" for n in EVAL]:
        for r in _lines(small, key):
            assert set(r["durations"]) == set(audio_paths(r))
            for rel, seconds in r["durations"].items():
                if rel in seen:
                    continue
                seen.add(rel)
                wave, sr = sf.read(rel, dtype="float32", always_2d=True)
                assert sr == 16000 and wave.shape[1] == 1, rel
                assert abs(wave.shape[0] / 16000 - seconds) < 1e-3, rel
                assert 0.09 < seconds < 30.5 and abs(wave).max() > 0, rel
    assert seen == {str(p) for p in (small / "audio").rglob("*.wav")}


def test_held_out_text_is_disjoint_from_training_text(small):
    train_text = set()
    for key in TRAIN:
        for r in _lines(small, key):
            train_text |= {m["content"] for m in r["messages"] if isinstance(m["content"], str)}
            train_text.add(r.get("meta", {}).get("question", ""))
    for r in _lines(small, "eval/asr_piper") + _lines(small, "eval/asr_real"):
        assert r["reference"] not in train_text
    for r in _lines(small, "eval/voice_chat_piper"):
        assert r["question"] not in train_text


def test_same_seed_gives_byte_identical_manifests_and_audio(small, tmp_path):
    # Another process (another string-hash seed) and another worker count: neither may matter.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "lalm", "data", "build", "--out", str(tmp_path),
                    "--size", "small", "--seed", "0", "--workers", "1", "--no-progress"],
                   check=True, env=env, capture_output=True)

    def digest(root: Path) -> dict[str, str]:
        files = [p for p in root.rglob("*") if p.is_file() and p.name != "README.md"]
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    a, b = digest(small), digest(tmp_path)
    assert len(a) > 300 and a == b


def test_full_size_plan_does_not_depend_on_the_string_hash_seed():
    """Set iteration order changes with PYTHONHASHSEED; the plan must not."""
    code = "from lalm.data.build import plan_digest; print(plan_digest('full', 0))"
    digests = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.slow
def test_full_build_meets_the_figures(tmp_path, request):
    if "slow" not in request.config.getoption("markexpr") or "not slow" in request.config.getoption("markexpr"):
        pytest.skip("the full corpus takes minutes: run with -m slow")
    res = build(tmp_path, "full", seed=0, workers=2, progress=False)
    train = sum(n for k, n in res.counts.items() if k.endswith("/train"))
    assert train >= 20000 and res.voices >= 40
    tasks = {r["task"] for key in TRAIN for r in _lines(tmp_path, key)}
    assert tasks == TASKS
