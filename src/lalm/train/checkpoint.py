"""Atomic, resumable training checkpoints (no pickle).

Layout of `OUT/checkpoints/step-000120/`:
    config.json, model.safetensors, tokenizer files   the HF-format model (lalm.load, transformers)
    trainer/state.json                                step, data position, config, lr schedule
    trainer/optimizer.safetensors                     AdamW moments, keyed "<param name>/<slot>"
    trainer/rng-rank{r}.safetensors                   torch / CUDA / numpy RNG of every rank
    trainer/params.safetensors                        (LoRA runs only) the unmerged trainable tensors

A checkpoint is written into `.tmp-step-000120/` and renamed when complete: rename is atomic on
POSIX, so a folder named `step-*` is always whole, whatever instant a SIGKILL lands.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lalm.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Test-only fault injection: SIGKILL this process half-way through writing this step's checkpoint
# (after the model, before the trainer state), to prove a torn write is never resumed from.
KILL_ENV = "LALM_TRAIN_KILL_DURING_CHECKPOINT"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def clean_partial(root: Path) -> None:
    """Remove the leftovers of writes or deletions a kill interrupted."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    # Data must reach the disk before the rename publishes it, or a power cut could expose
    # a complete-looking folder of empty files.
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: Path, step: int) -> Path:
    """Create the empty temporary folder for `step` (rank 0 only)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "trainer").mkdir(parents=True)
    return tmp


def maybe_inject_kill(step: int) -> None:
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def publish(tmp: Path, dst: Path) -> Path:
    """Move the complete folder `tmp` to `dst`, replacing any folder there. `dst` is always whole,
    old or new (or, between two renames, absent), whatever instant a kill lands: the old one is
    renamed away before it is deleted, never deleted in place (a half-deleted model folder still
    looks like a model). Used for checkpoints, a run's final/ and the demo's exported model."""
    _fsync_tree(tmp)
    trash = dst.with_name(f".trash-{dst.name}")
    shutil.rmtree(trash, ignore_errors=True)  # an earlier kill's leftover
    if dst.exists():
        os.rename(dst, trash)
    os.rename(tmp, dst)
    shutil.rmtree(trash, ignore_errors=True)
    return dst


def commit(root: Path, tmp: Path, step: int, keep: int) -> Path:
    """Publish `tmp` as `step-N` atomically, then drop all but the `keep` newest (rank 0 only)."""
    final = publish(tmp, step_dir(root, step))  # (a resumed run may re-reach a step it saved)
    if keep > 0:
        for old_step, old in complete_checkpoints(root)[:-keep]:
            # Rename first: a kill during rmtree then leaves only a .trash- folder, never a
            # half-deleted folder that still looks like a checkpoint.
            trash = root / f".trash-{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return final


# --- optimizer ---------------------------------------------------------------------------------


def optimizer_items(optimizer: torch.optim.Optimizer, names: dict[int, str]):
    """AdamW state as ("<param name>/<slot>", tensor) pairs in a fixed order (names: id(param) -> name).

    Under FSDP the moments are DTensor shards; `distributed.full_tensors` gathers them.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, value in sorted(optimizer.state.get(p, {}).items()):
                yield f"{names[id(p)]}/{slot}", value if isinstance(value, torch.Tensor) else torch.tensor(value)


def stateless_parameters(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    """Trainable parameters with no optimizer state yet: none of the steps so far gave them a
    gradient (the projector, while every batch was text-only). Saved in state.json, so a resume
    tells them apart from a parameter whose state is missing (another set of trainable params)."""
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], names: dict[int, str], source: str,
    stateless: frozenset[str] = frozenset(),
) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            slots = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
            if not slots and name in stateless:
                continue  # no state when saved: it gets one at its first gradient, as it would have
            if not slots:
                raise CheckpointError(f"{source}: no optimizer state for parameter {name!r}")
            state = {}
            for slot, value in slots.items():
                if slot == "step":
                    state[slot] = value.clone()
                else:
                    state[slot] = _like(value, p)
            optimizer.state[p] = state


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "device_mesh"):  # DTensor parameter: shard the full tensor the same way
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the whole tensor (read from disk): slice locally, no communication.
        return distribute_tensor(value.to(device=param.device_mesh.device_type, dtype=param.dtype),
                                 param.device_mesh, param.placements, src_data_rank=None)
    return value.to(device=param.device, dtype=param.dtype)


# --- RNG -----------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy_meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    py = random.getstate()
    out["python"] = torch.tensor(list(py[1]), dtype=torch.int64)
    return out


def restore_rng(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch"])
    if torch.cuda.is_available():
        # By device index, not by name ("cuda10" sorts before "cuda2" as text), and only for the
        # devices this process sees: a run saved where 8 GPUs were visible may resume on 4, and
        # set_rng_state_all would fail on the first state past the last device.
        saved = sum(k.startswith("cuda") for k in t)
        states = [t[f"cuda{i}"] for i in range(min(saved, torch.cuda.device_count()))]
        if states:
            torch.cuda.set_rng_state_all(states)
    pos, has_gauss = t["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, t["numpy_gauss"].item())
    )
    py = t["python"].tolist()
    random.setstate((3, tuple(py), None))


# --- whole trainer state ---------------------------------------------------------------------


def write_trainer_state(
    tmp: Path,
    state: dict,
    optimizer: dict[str, torch.Tensor] | None,
    params: dict[str, torch.Tensor] | None = None,
) -> None:
    if optimizer is not None:
        save_file(optimizer, str(tmp / "trainer" / "optimizer.safetensors"))
    if params is not None:
        save_file(params, str(tmp / "trainer" / "params.safetensors"))
    # state.json last: its presence is what marks a folder as a checkpoint.
    (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=1))


def write_rng(tmp: Path, rank: int) -> None:
    save_file(rng_tensors(), str(tmp / "trainer" / f"rng-rank{rank}.safetensors"))


def read_trainer_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "trainer" / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable trainer state: {e}") from e


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / "trainer" / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from checkpoint")
    return load_file(str(path))
