"""Audit of the training helpers: the feature cache after a kill, and the DPO reference key
(the importers' refusals are in test_train_importers.py).

    .venv/bin/pytest -q tests/test_train_audit.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_corpus import (
    asr_record,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread in this module)
    write_audio,
    write_manifest,
)

from lalm.errors import CheckpointError
from lalm.train import build, dpo_ref
from lalm.train.config import TrainConfig
from lalm.train.encoder_cache import INDEX, FeatureCache

# --- feature cache ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower():
    cfg = TrainConfig(stage="sft", init="preset:test-tiny", tokenizer="bytes")
    model = build.build_model(cfg, build.build_tokenizer(cfg))
    return model.audio_tower, model.config.audio.num_mel_bins


def killed_while_writing_the_index(monkeypatch, half: bool):
    """Path.write_text for index.json (or its temporary file) dies: after writing half the text
    (half=True, a kill during the write) or before writing anything (a kill just before it)."""
    real = Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(INDEX):
            if half:
                real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt("killed")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_cache_killed_while_writing_its_index_keeps_what_it_had(tmp_path, tower, monkeypatch):
    """The old index.json was rewritten in place: a kill during the write left half a JSON file,
    and every later run stopped on it (all the encoded rows lost to 'delete the folder')."""
    tw, n_mels = tower
    paths = [tmp_path / "a" / write_audio(tmp_path / "a", k) for k in range(3)]
    cache = FeatureCache(tmp_path / "c", tw, n_mels)
    assert cache.add(paths[:2], progress=False) == 2
    with monkeypatch.context() as m:
        killed_while_writing_the_index(m, half=True)
        with pytest.raises(KeyboardInterrupt):
            FeatureCache(tmp_path / "c", tw, n_mels).add(paths, progress=False)
    assert not list((tmp_path / "c").glob("*.tmp"))  # the interrupted write left no stray file
    again = FeatureCache(tmp_path / "c", tw, n_mels)
    assert paths[0] in again and paths[1] in again
    assert torch.equal(again.get(paths[0]), cache.get(paths[0]))
    assert again.add(paths, progress=False) == 1  # only the clip the killed run had not recorded


def test_cache_never_serves_rows_of_another_encoder_after_a_kill(tmp_path, tower, monkeypatch):
    """A run with other encoder weights rewrites the features file, then its index: killed between
    the two, the first encoder's index described the second encoder's rows, and a run with the
    first encoder served them as its own."""
    tw, n_mels = tower
    other = copy.deepcopy(tw)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    paths = [tmp_path / "a" / write_audio(tmp_path / "a", k) for k in range(2)]
    FeatureCache(tmp_path / "c", tw, n_mels).add(paths, progress=False)
    with monkeypatch.context() as m:
        killed_while_writing_the_index(m, half=False)
        with pytest.raises(KeyboardInterrupt):
            FeatureCache(tmp_path / "c", other, n_mels).add(paths[1:], progress=False)
    truth = FeatureCache(tmp_path / "fresh", tw, n_mels)
    truth.add(paths, progress=False)
    again = FeatureCache(tmp_path / "c", tw, n_mels)
    for p in paths:
        assert p not in again or torch.equal(again.get(p), truth.get(p)), p
    again.add(paths, progress=False)  # what was dropped is encoded again, with this encoder
    assert all(torch.equal(again.get(p), truth.get(p)) for p in paths)


def test_cache_without_its_features_file_starts_afresh(tmp_path, tower):
    tw, n_mels = tower
    path = tmp_path / "a" / write_audio(tmp_path / "a", 0)
    FeatureCache(tmp_path / "c", tw, n_mels).add([path], progress=False)
    (tmp_path / "c" / "features.safetensors").unlink()
    cache = FeatureCache(tmp_path / "c", tw, n_mels)
    assert path not in cache and cache.add([path], progress=False) == 1


def test_cache_written_before_shard_ids_is_still_read(tmp_path, tower):
    """Folders an earlier lalm wrote (no shard ids in either file) keep serving their rows."""
    tw, n_mels = tower
    path = tmp_path / "a" / write_audio(tmp_path / "a", 0)
    cache = FeatureCache(tmp_path / "c", tw, n_mels)
    cache.add([path], progress=False)
    index = tmp_path / "c" / INDEX
    meta = json.loads(index.read_text())
    meta.pop("shards", None)
    index.write_text(json.dumps(meta))
    features = tmp_path / "c" / "features.safetensors"
    save_file(load_file(str(features)), str(features))  # without the ids in its metadata
    old = FeatureCache(tmp_path / "c", tw, n_mels)
    assert path in old and torch.equal(old.get(path), cache.get(path))


# --- DPO reference --------------------------------------------------------------------------------


def test_dpo_reference_of_a_manifest_rewritten_in_place_is_refused(tmp_path):
    """The key held the manifest's path and record count only: the same file rewritten with the
    pairs in another order resumed with every pair scored against another pair's reference."""
    recs = [asr_record(tmp_path, k) for k in range(3)]
    manifest = write_manifest(tmp_path / "pairs.jsonl", recs)
    init = {"init": "preset:test-tiny"}
    path = dpo_ref.cache_path(tmp_path / "out", "train")
    dpo_ref.save(path, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]),
                 dpo_ref.fingerprint(str(manifest), 3, init))
    chosen, _ = dpo_ref.load(path, dpo_ref.fingerprint(str(manifest), 3, init))
    assert chosen.tolist() == [1.0, 2.0, 3.0]
    write_manifest(manifest, recs[::-1])
    with pytest.raises(CheckpointError, match="another manifest"):
        dpo_ref.load(path, dpo_ref.fingerprint(str(manifest), 3, init))


def test_dpo_reference_written_before_the_manifest_hash_still_resumes(tmp_path):
    manifest = write_manifest(tmp_path / "pairs.jsonl", [asr_record(tmp_path, 0)])
    init = {"init": "preset:test-tiny"}
    legacy = json.dumps({"manifest": str(manifest.resolve()), "records": 1, "init": init}, sort_keys=True)
    path = dpo_ref.cache_path(tmp_path / "out", "train")
    dpo_ref.save(path, torch.tensor([1.0]), torch.tensor([2.0]), legacy)
    assert dpo_ref.load(path, dpo_ref.fingerprint(str(manifest), 1, init))[1].tolist() == [2.0]
    with pytest.raises(CheckpointError):
        dpo_ref.load(path, dpo_ref.fingerprint(str(manifest), 2, init))
