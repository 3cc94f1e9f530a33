"""`--model` names: a local checkpoint folder, or a hub name found in the local Hugging Face cache.

lalm never downloads at run time. `Qwen/Qwen2-Audio-7B-Instruct` resolves to
huggingface_hub's cache (`hub_cache`: `$HF_HUB_CACHE`, default `$HF_HOME/hub`, default
`${XDG_CACHE_HOME:-~/.cache}/huggingface/hub`)
`/models--Qwen--Qwen2-Audio-7B-Instruct/snapshots/<rev>`, where <rev> is the commit that
`refs/main` names (or `name@rev` picks one); anything else is refused with the command to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lalm.errors import ConfigError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


def hub_cache() -> Path:
    """The cache folder huggingface_hub downloads into, found by its own rules (its constants.py):
    HF_HUB_CACHE, else the older HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub with HF_HOME defaulting
    to $XDG_CACHE_HOME/huggingface (~/.cache/huggingface); `~` and $VARS in them are expanded.
    Any other reading looks in a folder `huggingface-cli download` never wrote to."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        cache = os.path.join(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if revision is None:
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            revision = ref.read_text().strip()
        else:  # no refs (a hand-made cache): take the only snapshot, if there is exactly one
            found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
            return found[0] if len(found) == 1 else None
    ref = repo_dir / "refs" / revision  # a branch or tag name
    if ref.is_file():
        revision = ref.read_text().strip()
    path = snapshots / revision
    return path if path.is_dir() else None


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A checkpoint folder for `name` (a folder path, or `org/name[@revision]` in the HF cache)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a checkpoint folder (no config.json)")
        return path
    text = str(name)
    if path.exists():
        raise ConfigError(f"{text}: expected a checkpoint folder, got a file")
    if not _HUB_NAME.match(text):
        raise ConfigError(f"{text}: no such checkpoint folder")
    repo, _, revision = text.partition("@")
    cache = hub_cache()
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = _snapshot(repo_dir, revision or None) if repo_dir.is_dir() else None
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise ConfigError(
            f"{text}: not a local folder and not in the Hugging Face cache ({repo_dir}); lalm does not "
            f"download at run time: fetch it first (huggingface-cli download {repo}) or pass a folder")
    return snapshot
