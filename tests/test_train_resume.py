"""Crash safety and scale-out: SIGKILL mid-run and mid-checkpoint, then --resume gives the loss
curve of an uninterrupted run; torchrun with 2 processes (gloo, FSDP2) equals 1 process.

    .venv/bin/pytest -q tests/test_train_resume.py
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_corpus import (
    ENV,
    ROOT,
    asr_manifest,
    one_thread,  # noqa: F401 (autouse fixture: one torch thread in this module)
)

from lalm.errors import CheckpointError
from lalm.train import checkpoint
from lalm.train.config import TrainConfig
from lalm.train.loop import train
from lalm.train.metrics import read_metrics
from lalm.weights import load_checkpoint

STEPS, SAVE_EVERY = 12, 3


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "sft", "--config", str(ROOT / "configs/test/sft.yaml"), "--data", str(data),
            "--out", str(out), "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--progress=false",
            *extra]


def config(data: Path, out: Path) -> TrainConfig:
    return TrainConfig.load(ROOT / "configs/test/sft.yaml", [
        f"data={data}", f"out={out}", f"max_steps={STEPS}", f"save_every={SAVE_EVERY}", "progress=false"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (manifest, its metrics rows)."""
    folder = tmp_path_factory.mktemp("resume")
    data = asr_manifest(folder, n=8)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(data, folder / "uninterrupted"))
    finally:
        torch.set_num_threads(n)
    rows = read_metrics(folder / "uninterrupted")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return data, rows


def assert_same_curve(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])


def assert_checkpoints_whole(root: Path) -> None:
    """Every folder that looks like a checkpoint is complete and loads."""
    for step, folder in checkpoint.complete_checkpoints(root):
        assert checkpoint.read_trainer_state(folder)["step"] == step
        assert (folder / "trainer" / "optimizer.safetensors").is_file()
        load_checkpoint(folder, dtype=torch.float32)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith("step-")
                 and not (p / "trainer" / "state.json").is_file()]
    assert not leftovers


def test_sigkill_mid_run_then_resume_matches(reference, tmp_path):
    data, ref_rows = reference
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lalm", "train", *args(data, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(out)) >= 2 * SAVE_EVERY + 1:  # past the step-6 checkpoint, before the end
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = len(read_metrics(out))
    assert killed_at < STEPS
    assert_checkpoints_whole(out / "checkpoints")
    newest = checkpoint.newest_checkpoint(out / "checkpoints")
    assert newest is not None and checkpoint.read_trainer_state(newest)["step"] <= killed_at
    train(config(data, out), resume=True)
    assert_same_curve(read_metrics(out), ref_rows)


def test_sigkill_during_checkpoint_write_never_leaves_a_torn_checkpoint(reference, tmp_path):
    data, ref_rows = reference
    out = tmp_path / "torn"
    env = {**ENV, checkpoint.KILL_ENV: str(2 * SAVE_EVERY)}  # die half-way through writing step 6
    proc = subprocess.run([sys.executable, "-m", "lalm", "train", *args(data, out)], env=env,
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    root = out / "checkpoints"
    torn = root / f".tmp-step-{2 * SAVE_EVERY:06d}"
    assert (torn / "model.safetensors").is_file() and not (torn / "trainer" / "state.json").exists()
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [SAVE_EVERY]
    assert_checkpoints_whole(root)
    train(config(data, out), resume=True)
    assert not torn.exists()  # cleaned up on resume
    assert_same_curve(read_metrics(out), ref_rows)
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [3 * SAVE_EVERY, STEPS]  # keep_checkpoints=2


def test_torchrun_two_processes_fsdp_equals_one_process(reference, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    data, _ = reference
    steps = 10
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "lalm", "train",
           *args(data, out, "--fsdp", "--batch-size", "8"), "--max-steps", str(steps), "--save-every", "0"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rows = read_metrics(out)
    one = tmp_path / "one"
    cfg = config(data, one)
    cfg.max_steps, cfg.save_every = steps, 0
    train(cfg)
    single = read_metrics(one)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for a, b in zip(rows, single):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp"])
def test_torchrun_text_only_and_audio_records_mixed_equal_one_process(tmp_path, fsdp):
    """A rank whose micro-batch held only text-only lines skipped the encoder while another ran it:
    the gradient average (data-parallel) or FSDP's gathers then mismatched and the run died. Here
    length grouping puts the audio lines on rank 0 and the text-only ones on rank 1. The eval set
    also holds a record that fails only when decoded, at an index rank 1 evaluates: the summary
    counts it (it counted rank 0's failures only)."""
    from train_corpus import WORDS, asr_record, corrupt_flac, write_manifest

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    text = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in WORDS[:4]]
    records = [r for k in range(4) for r in (asr_record(tmp_path, k), text[k])]
    data = write_manifest(tmp_path / "mixed.jsonl", records)
    bad = asr_record(tmp_path, 5)
    bad["messages"][0]["content"][0]["audio"] = corrupt_flac(tmp_path)
    dev = write_manifest(tmp_path / "dev.jsonl", records[:1] + [bad] + records[1:])  # index 1: rank 1's
    out = tmp_path / "two"
    extra = ["--micro-batch-size", "2", "--eval-data", str(dev), "--eval-every", "2"] + (["--fsdp"] if fsdp else [])
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "lalm", "train",
           *args(data, out, "--batch-size", "8", *extra), "--max-steps", "4", "--save-every", "0"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    cfg = config(data, tmp_path / "one")
    cfg.max_steps, cfg.save_every, cfg.micro_batch_size, cfg.eval_data, cfg.eval_every = 4, 0, 2, str(dev), 2
    train(cfg)
    for run in (out, tmp_path / "one"):
        assert json.loads((run / "summary.json").read_text())["skipped_eval_records"] == 1, run
    two, one = read_metrics(out), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 4]
    for a, b in zip(two, one):
        for key in ("loss", "eval_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-4 * b[key], (key, a, b)


def test_dpo_with_lora_resumes_exactly(tmp_path):
    """Resume reloads the cached reference log-probs and the unmerged LoRA tensors."""
    from train_corpus import dpo_record, write_manifest

    pairs = write_manifest(tmp_path / "pairs.jsonl", [dpo_record(tmp_path, k) for k in range(8)])

    def cfg(out: Path) -> TrainConfig:
        return TrainConfig.load(ROOT / "configs/test/dpo.yaml", [
            f"data={pairs}", f"out={out}", "max_steps=6", "save_every=3", "progress=false", "lr=3e-3",
            "lora_r=4", "lora_target_modules=[q_proj, v_proj]", "freeze=[encoder]"])

    train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")  # as if killed after step 3's checkpoint
    train(cfg(tmp_path / "b"), resume=True)
    assert_same_curve(read_metrics(tmp_path / "b"), read_metrics(tmp_path / "a"))
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "trainer" / "params.safetensors").is_file()
    (tmp_path / "b" / "dpo_ref" / "train.safetensors").unlink()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    with pytest.raises(CheckpointError, match="reference log-probs"):
        train(cfg(tmp_path / "b"), resume=True)  # never recomputed from a trained model


def test_a_kill_while_replacing_final_leaves_a_whole_model(tmp_path, monkeypatch):
    """A rerun replaces OUT/final. The old folder used to be deleted in place before the new one
    was renamed in: a kill during the deletion left a final/ with its config but not all of its
    weights, a broken model where a whole one had been (the demo's export had the same window).
    Now the old folder is renamed away first and deleted afterwards."""
    data = asr_manifest(tmp_path, n=8)
    cfg = config(data, tmp_path / "run")
    cfg.max_steps, cfg.save_every = 1, 0
    train(cfg)
    rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        path = Path(path)
        if (path / "model.safetensors").is_file():  # deleting a whole model folder: die half-way
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt(f"killed while deleting {path}")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    load_checkpoint(tmp_path / "run" / "final", dtype=torch.float32)


def test_resume_when_a_trainable_parameter_never_had_a_gradient(tmp_path):
    """Text-only lines never run the projector (nor the encoder): AdamW keeps no state for them,
    the checkpoint holds none, and resuming refused it ("no optimizer state for parameter")."""
    from train_corpus import WORDS, write_manifest

    text = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in WORDS[:8]]
    data = write_manifest(tmp_path / "text.jsonl", text)
    cfg = config(data, tmp_path / "run")
    cfg.max_steps, cfg.save_every = 4, 2
    train(cfg)
    state = checkpoint.read_trainer_state(checkpoint.step_dir(tmp_path / "run" / "checkpoints", 4))
    assert "multi_modal_projector.linear.weight" in state["stateless_params"]
    cfg.max_steps = 6
    train(cfg, resume=True)  # from step 4: the projector's AdamW state starts at its first gradient
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-2:] == [5, 6]


def test_resume_with_other_batches_says_it_no_longer_replays_the_run(tmp_path):
    """--resume with another batch size or seed went on silently, though the remaining steps then
    see other records than the uninterrupted run would (the guarantee --resume otherwise gives)."""
    data = asr_manifest(tmp_path, n=8)
    cfg = config(data, tmp_path / "run")
    cfg.max_steps, cfg.save_every, cfg.batch_size = 2, 2, 2
    train(cfg)
    cfg.max_steps, cfg.batch_size, cfg.seed = 3, 4, cfg.seed + 1
    with pytest.warns(UserWarning, match=r"batch_size=4 \(was 2\), seed=.*do not replay"):
        train(cfg, resume=True)
