"""Frozen-encoder feature cache: encode every clip once, train the projector and decoder many times.

With the audio encoder frozen, its output for a clip never changes, yet on a CPU it costs as
much as a decoder training pass. So `FeatureCache` runs `audio_tower` once per audio file and
stores the kept rows (the `num_audio_tokens` vectors per window, after AvgPool and LayerNorm,
*before* the projector) on disk:

    DIR/features.safetensors   one (sum N, d_model) fp16 tensor per shard, "shard_<k>";
                               metadata {"shards": [id of shard k, ...]}
    DIR/index.json             {"fingerprint": ..., "n_mels": 80, "d_model": 384, ["dtype": "float32",]
                                "keys": "sha1", "shards": [id, ...],
                                "items": {sha1 of the file: [shard, offset, n_tokens]}}

The two files are replaced one after the other (each atomically), so a run killed between the
two, or two runs writing the same folder at once, can leave an index that describes another
features file. Every shard therefore carries a random id in both: an item is served only if its
shard has the same id in the features file as in the index; the rest are encoded again.

fp16 halves the disk and memory at a relative rounding of 2^-11 per value; `dtype=torch.float32`
keeps the encoder's output exactly (tests compare it with the mel path). A clip the encoder
cannot read (unreadable, too short for one token) is left out, so the trainer skips its records.

The fingerprint hashes the encoder's weights, so a cache built with other weights is never
reused. Clips are keyed by the SHA-1 of their bytes, not by path: a corpus rebuilt in place with
other audio is re-encoded rather than served stale rows, and a corpus moved or copied to
another folder reuses its rows (hashing ~1 GB of clips takes a few seconds; encoding, minutes). Clips are encoded in batches of similar length (less padding). Long audio (> 30 s)
is split into windows exactly as `processor.audio_windows` does, and its windows' rows are
concatenated in order, which is what `model.encode_audio` gives before the projector.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lalm import audio as A
from lalm.errors import CheckpointError, LalmError
from lalm.processor import audio_windows

INDEX = "index.json"
FEATURES = "features.safetensors"


def encoder_fingerprint(tower: torch.nn.Module) -> str:
    """A short hash of the encoder's weights (names, shapes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_windows(tower: torch.nn.Module, mels: list[torch.Tensor], frames: list[int]) -> list[torch.Tensor]:
    """mel windows (n_mels, F_i) with L_mel_i valid frames -> kept rows (N_i, d) per window, on the
    CPU; the encoder runs wherever its weights are (a GPU, if the trainer put it there)."""
    dev = next(tower.parameters()).device
    F = max(m.shape[1] for m in mels)
    mel = torch.zeros(len(mels), mels[0].shape[0], F)  # (A, n_mels, F) right padded
    for i, m in enumerate(mels):
        mel[i, :, : m.shape[1]] = m
    x = tower(mel.to(dev), torch.tensor(frames, device=dev)).cpu()  # (A, P, d)
    return [x[i, : A.num_audio_tokens(f)] for i, f in enumerate(frames)]


class FeatureCache:
    """Encoder outputs per audio path, persisted under `folder`."""

    def __init__(self, folder: str | Path, tower: torch.nn.Module, n_mels: int, dtype: torch.dtype = torch.float16):
        self.folder = Path(folder)
        self.tower = tower.eval()
        self.n_mels = n_mels
        self.dtype = dtype
        self.d_model = int(tower.layer_norm.weight.shape[0])
        self.fingerprint = encoder_fingerprint(tower)
        self.items: dict[str, tuple[int, int, int]] = {}  # content key -> (shard, offset, n_tokens)
        self.shards: list[torch.Tensor] = []
        self.shard_ids: list[str] = []  # pairs index.json with features.safetensors (module docstring)
        self._keys: dict[str, str | None] = {}  # path -> content key (None: unreadable)
        self._load()

    def _load(self) -> None:
        index = self.folder / INDEX
        if not index.is_file():
            return
        try:
            meta = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: not valid JSON ({e}); delete the folder to rebuild") from None
        if (meta.get("fingerprint"), meta.get("n_mels"), meta.get("d_model"), meta.get("dtype", "float16"),
                meta.get("keys")) != (self.fingerprint, self.n_mels, self.d_model, _dtype_name(self.dtype), "sha1"):
            return  # another encoder: start afresh (the files are rewritten on save)
        features = self.folder / FEATURES
        if not features.is_file():
            return  # deleted, or never written: nothing to serve
        with safe_open(str(features), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("shards", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        shards = [tensors[f"shard_{k}"] for k in range(len(tensors))]
        ids = meta.get("shards")
        if ids is None and stored is None:  # written before shard ids: trusted as it was
            ids = stored = [secrets.token_hex(8) for _ in shards]
        if ids is None or stored is None:
            return  # one file has ids, the other not: they were not written together
        keep = [k for k in range(min(len(ids), len(stored), len(shards))) if ids[k] == stored[k]]
        new = {k: i for i, k in enumerate(keep)}  # renumbered: unpaired shards are dropped
        self.shards = [shards[k] for k in keep]
        self.shard_ids = [stored[k] for k in keep]
        self.items = {p: (new[s], off, n) for p, (s, off, n) in meta["items"].items()
                      if s in new and off + n <= shards[s].shape[0]}

    def key(self, path: str) -> str | None:
        """The content key of an audio file (None if it cannot be read), computed once per path."""
        path = str(path)
        if path not in self._keys:
            try:
                self._keys[path] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
            except OSError:
                self._keys[path] = None
        return self._keys[path]

    def __contains__(self, path: str) -> bool:
        return self.key(path) in self.items

    def __len__(self) -> int:
        return len(self.items)

    def get(self, path: str) -> torch.Tensor:
        """(N, d_model) rows of one audio file (the cache's dtype, fp16 by default)."""
        shard, off, n = self.items[self.key(path)]
        return self.shards[shard][off: off + n]

    def tokens(self, path: str) -> int:
        return self.items[self.key(path)][2]

    def add(self, paths: Iterable[str], batch_seconds: float = 60.0, progress: bool = True,
            desc: str = "encoding audio") -> int:
        """Encode the paths not cached yet (batches of ~batch_seconds of audio); returns how many."""
        todo, keys = [], set()
        for p in sorted({str(p) for p in paths}):
            k = self.key(p)
            if k is not None and k not in self.items and k not in keys:  # unreadable: skipped, counted later
                todo.append(p)
                keys.add(k)
        if not todo:
            return 0
        import soundfile as sf
        from tqdm import tqdm

        def seconds(p: str) -> float:
            try:
                info = sf.info(p)
                return info.frames / info.samplerate
            except RuntimeError:  # raw PCM and the like: load_audio knows them
                try:
                    return len(A.load_audio(p)) / A.SAMPLE_RATE
                except LalmError:  # unreadable: skipped below
                    return 0.0

        todo.sort(key=seconds)  # similar lengths together: less padding
        rows, out, pos = [], [], 0
        bar = tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress)
        i = 0
        while i < len(todo):
            # the longest clip in a batch bounds its padded cost: ~batch_seconds of padded audio
            per = max(1, int(batch_seconds / max(min(seconds(todo[i]), 30.0), 0.5)))
            group, chunk = [], todo[i: i + per]
            for p in chunk:
                try:
                    mels, frames, _ = audio_windows(p, self.n_mels, name=p)
                except (LalmError, RuntimeError, OSError):  # unreadable / too short: its records are skipped
                    continue
                group.append((p, mels, frames))
            i += len(chunk)
            bar.update(len(chunk))
            if not group:
                continue
            mels = [m for _, ms, _ in group for m in ms]
            frames = [f for _, _, fs in group for f in fs]
            feats = encode_windows(self.tower, mels, frames)
            k = 0
            for p, ms, _ in group:
                x = torch.cat(feats[k: k + len(ms)]).to(self.dtype)  # (N, d)
                k += len(ms)
                out.append(x)
                rows.append((p, pos, x.shape[0]))
                pos += x.shape[0]
        bar.close()
        if not out:
            return 0
        shard = len(self.shards)
        self.shards.append(torch.cat(out))
        self.shard_ids.append(secrets.token_hex(8))
        for p, off, n in rows:
            self.items[self.key(p)] = (shard, off, n)
        self.save()
        return len(rows)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._replace(FEATURES, lambda tmp: save_file(
            {f"shard_{k}": t.contiguous() for k, t in enumerate(self.shards)}, str(tmp),
            metadata={"shards": json.dumps(self.shard_ids)}))
        meta = {"fingerprint": self.fingerprint, "n_mels": self.n_mels, "d_model": self.d_model,
                "dtype": _dtype_name(self.dtype), "keys": "sha1", "shards": self.shard_ids, "items": self.items}
        self._replace(INDEX, lambda tmp: tmp.write_text(json.dumps(meta)))

    def _replace(self, name: str, write) -> None:
        """Write folder/name whole through a temporary file, so a kill never leaves half of it. The
        temporary name is this process's alone: two runs sharing the folder must not write into
        one file. On an exception (Ctrl-C included) no stray copy of the features is left behind."""
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        try:
            write(tmp)
            tmp.replace(self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def seconds(self) -> float:
        """Audio seconds cached (25 tokens per second)."""
        return sum(n for _, _, n in self.items.values()) / 25.0 if self.items else 0.0



def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
