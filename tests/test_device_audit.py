"""Code paths that behave differently on CUDA (or in bf16), checked where a CPU can see them.

A CPU run cannot show a device mismatch: every tensor is on the CPU. So these tests look at what
a GPU run depends on instead: every tensor the decode paths create names its device; a decode
step's host reads do not grow with its rows; moving the live rows copies the KV cache a layer at
a time (peak GPU memory); which CUDA RNG states a resume restores and which mesh FSDP shards
onto (torch.cuda / the accelerator monkeypatched); how the trainer reads `device:`. The `gpu`
tests at the end run the decode paths and the RNG round trip on a real GPU where torch sees one
(this project's CI has none; a CPU test runs the same decode paths):

    pytest -q -m gpu tests/test_device_audit.py
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lalm import beam
from lalm import generate as gen
from lalm.config import ModelConfig
from lalm.errors import ConfigError
from lalm.model import Qwen2AudioForConditionalGeneration
from lalm.processor import Batch
from lalm.train import checkpoint, distributed


def tiny_model() -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen2AudioForConditionalGeneration(ModelConfig.preset("test-tiny")).eval()


def batch_of(prompts: list[list[int]]) -> Batch:
    """Text-only prompts, left padded as processor.collate pads them."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = True
    return Batch(ids, mask, (mask.long().cumsum(1) - 1).clamp(min=0))


PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23]]


def sampling_rows(n: int = 2) -> list[gen.Row]:
    """Seeded rows that take every sampling filter, the repetition penalty and top log-probs."""
    return [gen.Row(options=gen.SamplingOptions(
        max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.3, min_new_tokens=2,
        stop_token_ids=(7,), top_logprobs=3, seed=s)) for s in range(n)]


# ---------------------------------------------------------------- tensors follow the model


class FactoryWithoutDevice(TorchFunctionMode):
    """Records every tensor factory that lalm's own code calls without `device=`: on a GPU such a
    tensor lands on the CPU, and the first op that mixes it with the model's tensors fails."""

    FACTORIES = frozenset({torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
                           torch.rand, torch.randn, torch.randint, torch.linspace, torch.as_tensor})

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code
            parts = caller.co_filename.replace("\\", "/").split("/")
            if "lalm" in parts and "kernels" not in parts:  # lalm.kernels: the CPU decode kernel
                self.found.append(f"{func.__name__} in {caller.co_name} ({caller.co_filename})")
        return func(*args, **kwargs)


def test_the_decode_paths_name_a_device_for_every_tensor_they_create():
    """Greedy, sampling (penalty, min-new-tokens, top log-probs), continuous batching and beam
    search: a tensor made without `device=` would be a CPU tensor beside CUDA logits."""
    model = tiny_model()
    greedy = [gen.Row(options=gen.SamplingOptions(max_new_tokens=4)) for _ in PROMPTS]
    with FactoryWithoutDevice() as mode:
        for _ in gen.generate(model, batch_of(PROMPTS), sampling_rows()):
            pass
        state = gen.DecodeState.start(model, batch_of(PROMPTS), greedy, max_rows=4, max_len=64)
        state.step()
        state.add(batch_of([[31, 32, 33, 34, 35, 36, 37]]), sampling_rows(1))  # longer: shifts the rows
        state.step()
        state.rows[0].finish("abort")
        state.pop_finished()
        state.step()
        beam.search(model, batch_of(PROMPTS), gen.SamplingOptions(max_new_tokens=4, num_beams=3, min_new_tokens=1,
                                                                 repetition_penalty=1.2, stop_token_ids=(7, 9)))
    assert mode.found == []


def test_a_decode_step_reads_the_positions_once_not_once_per_row(monkeypatch):
    """`int(tensor)` is a device-to-host copy and a sync on a GPU; a step made one per row
    (int(next_pos[slot])) on top of the reads it needs. Same prompt lengths: no padding either way."""
    model = tiny_model()
    calls = [0]
    real = torch.Tensor.__int__

    def counted(self):
        calls[0] += 1
        return real(self)

    def reads(n: int) -> int:
        rows = [gen.Row(options=gen.SamplingOptions(max_new_tokens=8)) for _ in range(n)]
        state = gen.DecodeState.start(model, batch_of([PROMPTS[0]] * n), rows)
        monkeypatch.setattr(torch.Tensor, "__int__", counted)
        calls[0] = 0
        state.step()
        monkeypatch.setattr(torch.Tensor, "__int__", real)
        return calls[0]

    assert reads(4) == reads(1)


def test_moving_the_live_rows_copies_one_layer_at_a_time(monkeypatch):
    """Shifting the live rows (a longer prompt joins, the oldest rows leave) needs a copy of the
    moved columns; made for every layer at once, it briefly doubled the live KV cache, which on
    a GPU whose memory holds the cache and little more is an out-of-memory error."""
    model = tiny_model()
    rows = [gen.Row(options=gen.SamplingOptions(max_new_tokens=8)) for _ in PROMPTS]
    state = gen.DecodeState.start(model, batch_of(PROMPTS), rows, max_rows=4, max_len=64)
    state.step()
    sizes = []
    real = torch.Tensor.clone

    def clone(self, *args, **kwargs):
        sizes.append(self.numel())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    n, pos = state.n, state.pos
    with torch.inference_mode():  # as add() and pop_finished() call it
        state._shift(3)
        state._shift(-3)
    _, _, hkv, _, d = state.cache.k.shape
    assert sizes and max(sizes) <= n * hkv * pos * d  # one layer's live columns


# ---------------------------------------------------------------- training on a GPU


def test_resume_restores_cuda_rng_states_by_device_index_and_only_for_visible_devices(monkeypatch):
    """A checkpoint holds one CUDA RNG state per GPU the saving process saw ("cuda0".."cuda11").
    They were restored in name order (cuda10 before cuda2) and all of them, which fails where
    fewer GPUs are visible (set_rng_state_all indexes a device that is not there)."""
    t = checkpoint.rng_tensors()
    t = {k: v for k, v in t.items() if not k.startswith("cuda")}
    t.update({f"cuda{i}": torch.tensor([i], dtype=torch.uint8) for i in range(12)})
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([int(s) for s in states]))
    for visible in (12, 4):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=visible: n)
        checkpoint.restore_rng(t)
    assert restored == [list(range(12)), list(range(4))]


@pytest.mark.parametrize("device", ["cuda:0", "gpu", "mps"])
def test_a_train_device_torch_would_not_use_is_refused(device, monkeypatch):
    """`device: cuda:0` used to read as "not cuda": a CPU run, silently."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        distributed.setup(device)


def test_device_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        distributed.setup("cuda")
    assert distributed.setup("auto").device.type == "cpu"


def test_fsdp_shards_onto_the_training_device_not_the_builds_accelerator(tmp_path, monkeypatch):
    """fully_shard's default mesh is torch's accelerator: on a CUDA build a `device: cpu` run
    (gloo, CPU batches) had its shards put on a GPU. Here the build is made to report CUDA."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny_model()
        monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
        distributed.apply_fsdp(model, torch.device("cpu"))
        assert {p.device_mesh.device_type for p in model.parameters()} == {"cpu"}
        assert {p.to_local().device.type for p in model.parameters()} == {"cpu"}
    finally:
        dist.destroy_process_group()


def test_eval_under_torchrun_binds_each_rank_to_its_own_gpu(monkeypatch):
    """`lalm eval` under torchrun: NCCL's barrier runs on the bound device, else on the current
    one, which nothing had set: cuda:0 on every rank, where the ranks' barrier hangs."""
    import torch.distributed as dist

    from lalm.eval import runner

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append(("init", a, kw)))
    assert runner._dist()[:2] == (1, 2)
    cuda1 = torch.device("cuda", 1)
    assert calls == [("set_device", cuda1), ("init", ("nccl",), {"device_id": cuda1})]


# ---------------------------------------------------------------- every decode path, on the CPU and on a GPU


def every_decode_path(device: str, dtype: torch.dtype) -> None:
    """Sampling with every filter (seeded: the same tokens twice), continuous batching and beam
    search on a model on `device` in `dtype`: what the GPU test runs, and the CPU test beside it."""
    model = tiny_model().to(device, dtype)
    runs = []
    for _ in range(2):
        rows = sampling_rows()
        for _ in gen.generate(model, batch_of(PROMPTS), rows):
            pass
        runs.append([r.tokens for r in rows])
        assert all(r.finish_reason and len(r.top_logprobs) == len(r.tokens) for r in rows)
    assert runs[0] == runs[1]
    state = gen.DecodeState.start(model, batch_of(PROMPTS), sampling_rows(), max_rows=4, max_len=64)
    state.step()
    state.add(batch_of([[31, 32, 33, 34, 35, 36, 37]]), [gen.Row(options=gen.SamplingOptions(max_new_tokens=4))])
    state.step()
    state.rows[0].finish("abort")
    state.pop_finished()
    state.step()
    assert state.cache.k.device.type == device and state.cache.k.dtype == dtype
    found = beam.search(model, batch_of(PROMPTS), gen.SamplingOptions(
        max_new_tokens=4, num_beams=3, repetition_penalty=1.2, stop_token_ids=(7, 9)))
    assert len(found) == 2 and all(b.tokens for b in found)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_decode_path_on_the_cpu(dtype):
    every_decode_path("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_decode_path_on_cuda(dtype):
    every_decode_path("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_round_trips_through_a_checkpoint():
    saved = checkpoint.rng_tensors()
    first = torch.rand(4, device="cuda")
    checkpoint.restore_rng(saved)
    assert torch.equal(torch.rand(4, device="cuda"), first)
