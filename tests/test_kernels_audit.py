"""lalm.kernels, audited: ways the decode kernel's build or its packed copies crashed a run where
they must fall back (to numpy's OpenBLAS / torch) or stay correct."""

from __future__ import annotations

import pathlib

import pytest
import torch

from lalm import kernels

x86_kernel_cpu = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="elsewhere the kernel is never built (nothing to fall back from)",
)


@x86_kernel_cpu
def test_compiler_output_not_in_utf8_falls_back_with_one_line(monkeypatch, tmp_path):
    """A compiler in a Latin-1 locale writes its errors in Latin-1: decoding them as UTF-8 raised
    UnicodeDecodeError out of decode_gemm_fn() instead of the fallback warning. The warning is one
    line too (compiler diagnostics span several)."""
    cc = tmp_path / "cc"
    cc.write_bytes(b"#!/bin/sh\nprintf 'decode_gemm.c:1: erreur: \\351chec\\n  1 | x\\n' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setattr(kernels, "_fn", [])
    monkeypatch.delenv("LALM_KERNELS", raising=False)  # LALM_KERNELS=0 would skip the build
    monkeypatch.setenv("LALM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", str(cc))
    with pytest.warns(UserWarning, match="could not be built") as record:
        assert kernels.decode_gemm_fn() is None
    message = str(record[0].message)
    assert "chec" in message and "\n" not in message


@x86_kernel_cpu
def test_no_home_directory_falls_back(monkeypatch):
    """Without LALM_HOME, the cache is under Path.home(), which raises RuntimeError where no home
    can be found (HOME unset under a uid with no passwd entry, as containers run): that escaped
    decode_gemm_fn() and failed the decode step instead of falling back."""

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(kernels, "_fn", [])
    monkeypatch.delenv("LALM_KERNELS", raising=False)
    monkeypatch.delenv("LALM_HOME", raising=False)
    monkeypatch.setattr(pathlib.Path, "home", classmethod(no_home))
    with pytest.warns(UserWarning, match="home directory"):
        assert kernels.decode_gemm_fn() is None


def test_panels_of_an_inference_tensor_are_never_fresh():
    """Inference tensors have no version counter (reading _version raises): packing one or asking
    whether a copy of one is fresh raised RuntimeError. Such a weight can change in place unseen
    (a load_state_dict under inference_mode), so a copy of it is never fresh."""
    with torch.inference_mode():
        w = torch.randn(16, 8)
    assert kernels.version_of(w) is None
    p = kernels.Panels.pack(torch.randn(16, 8))
    assert not p.fresh(w)
    assert not kernels.Panels.pack(w).fresh(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_loaded_under_inference_mode_generates(hf_checkpoint, tiny, tmp_path, dtype):
    """`with torch.inference_mode(): model = lalm.load(...)`, a common idiom, then generate on the
    CPU: use_decode_layout packed the kernel's copies of inference tensors and raised "Inference
    tensors do not track version counter" (fp32 and bf16, with or without the kernel). Now those
    weights get no copy and decode through the other path: the same greedy ids as a model loaded
    normally."""
    from test_generate import CONVERSATIONS, tiny_lalm_folder

    import lalm

    folder = tiny_lalm_folder(hf_checkpoint("gqa"), tmp_path / "ckpt")  # the one `tiny` loaded
    convs = [CONVERSATIONS[k] for k in ["text_only", "voice_only"]]
    normal = tiny if dtype == torch.float32 else lalm.load(folder, dtype=dtype)
    with torch.inference_mode():
        model = lalm.load(folder, dtype=dtype)
    assert model.model.language_model.lm_head.weight.is_inference()
    got = model.generate(convs, max_new_tokens=8, min_new_tokens=8, temperature=0)
    want = normal.generate(convs, max_new_tokens=8, min_new_tokens=8, temperature=0)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert model.model.language_model.model.layers[0].mlp.down_panels is None
