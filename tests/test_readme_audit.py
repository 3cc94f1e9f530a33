"""README audit: the rerun command `lalm demo` prints under "use it" must reuse that run's steps."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lalm.demo import RECIPE_DIR
from lalm.demo_report import again_command


def _p(home, quick=False, threads=None, device="cpu", recipe_dir=RECIPE_DIR):
    return SimpleNamespace(home=Path(home), quick=quick, threads=threads, device=device, recipe_dir=recipe_dir)


def test_plain_run_says_make_demo(monkeypatch, tmp_path):
    monkeypatch.setenv("LALM_HOME", str(tmp_path))
    assert again_command(_p(tmp_path)) == "make demo"
    assert again_command(_p(tmp_path / "other")) == f"LALM_HOME={tmp_path / 'other'} make demo"


def test_quick_and_other_draws_name_their_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("LALM_HOME", str(tmp_path))
    # `make demo` would train the full recipe in corpus/ and demo/, not reuse demo-quick/.
    assert again_command(_p(tmp_path, quick=True)) == "lalm demo --quick"
    assert again_command(_p(tmp_path, threads=0)) == "lalm demo --threads 0"
    assert again_command(_p(tmp_path, device="cuda")) == "lalm demo --device cuda"
    assert again_command(_p(tmp_path, recipe_dir=tmp_path / "r")) == f"lalm demo --recipe {tmp_path / 'r'}"
