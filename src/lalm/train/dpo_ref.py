"""DPO reference log-probs: computed once from the frozen starting model, cached on disk.

Eq. 2 needs log P_ref(y|x) for every chosen and rejected answer. P_ref is the starting model,
so instead of holding a second copy of it in memory for the whole run we score every pair once,
before the first update, and keep two numbers per pair in `OUT/dpo_ref/<name>.safetensors`.
`--resume` reads the file back (the model has moved on by then, so it must never recompute).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lalm.errors import CheckpointError


def cache_path(out: Path, name: str) -> Path:
    return out / "dpo_ref" / f"{name}.safetensors"


def fingerprint(manifest: str, n_records: int, init: dict) -> str:
    """What the reference depends on. The log-probs are stored by record index, so a manifest
    rewritten in place (other pairs, or the same ones reordered, with the same count) must not
    match: its bytes are hashed, not only its path and length."""
    path = Path(manifest)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise CheckpointError(f"{manifest}: cannot read the DPO manifest ({e})") from None
    return json.dumps({"manifest": str(path.resolve()), "manifest_sha256": digest, "records": n_records,
                       "init": init}, sort_keys=True)


def _same_run(stored: str | None, key: str) -> bool:
    """Caches written before the manifest's hash was part of the key are still read on --resume
    (they cannot be recomputed); their other fields must match."""
    if stored is None:
        return False
    try:
        old, new = json.loads(stored), json.loads(key)
    except json.JSONDecodeError:
        return stored == key
    if isinstance(old, dict) and isinstance(new, dict) and "manifest_sha256" not in old:
        new.pop("manifest_sha256", None)
    return old == new


def save(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"chosen": chosen.double().cpu().contiguous(), "rejected": rejected.double().cpu().contiguous()},
              str(tmp), metadata={"fingerprint": key})
    tmp.replace(path)  # atomic: a kill leaves either no cache or a whole one


def load(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: the DPO reference log-probs of this run are missing; they cannot be "
                              "recomputed after training started (start the run again without --resume)")
    with safe_open(str(path), framework="pt") as f:
        if not _same_run((f.metadata() or {}).get("fingerprint"), key):
            raise CheckpointError(f"{path}: reference log-probs were computed for another manifest or model")
        return f.get_tensor("chosen"), f.get_tensor("rejected")


def compute(score: Callable[[list[int]], torch.Tensor], n_records: int, rank: int, world: int,
            micro: int, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every pair: `score(indices) -> (2 * len,)` log-probs laid out chosen, rejected per pair.

    Ranks take interleaved shares padded to equal length (FSDP forwards are collective, so every
    rank must run the same number of them); padding repeats an index and is discarded.
    """
    mine = list(range(rank, n_records, world))
    per_rank = -(-n_records // world)
    mine += [mine[-1] if mine else 0] * (per_rank - len(mine))
    chosen = torch.zeros(n_records, dtype=torch.float64)
    rejected = torch.zeros(n_records, dtype=torch.float64)
    seen = set()
    for start in range(0, per_rank, micro):
        idx = mine[start: start + micro]
        logps = score(idx).double().cpu()
        for j, i in enumerate(idx):
            if i in seen or i % world != rank:
                continue
            seen.add(i)
            chosen[i], rejected[i] = logps[2 * j], logps[2 * j + 1]
    both = all_sum(torch.stack([chosen, rejected]))
    return both[0], both[1]
