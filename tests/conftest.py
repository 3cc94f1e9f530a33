"""Shared fixtures. Reference checkpoints are built once per session by transformers itself
(see hf_reference.py, importable by any test: `from hf_reference import build_hf_checkpoint`)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(shape="gqa", seed=0) -> folder saved by transformers' save_pretrained.

    Shapes: "gqa", "mha", "odd" (hf_reference.SHAPES). Needs transformers (skips without it).
    """
    pytest.importorskip("transformers")
    from hf_reference import build_hf_checkpoint

    cache = {}

    def get(shape: str = "gqa", seed: int = 0):
        if (shape, seed) not in cache:
            cache[shape, seed] = build_hf_checkpoint(
                tmp_path_factory.mktemp(f"hf-{shape}-{seed}"), shape, seed
            )
        return cache[shape, seed]

    return get


@pytest.fixture(scope="session")
def hf_model(hf_checkpoint):
    """Factory: hf_model(shape="gqa", seed=0) -> transformers' Qwen2AudioForConditionalGeneration (fp32, eval)."""
    from hf_reference import load_hf_model

    cache = {}

    def get(shape: str = "gqa", seed: int = 0):
        if (shape, seed) not in cache:
            cache[shape, seed] = load_hf_model(hf_checkpoint(shape, seed))
        return cache[shape, seed]

    return get


@pytest.fixture(scope="session")
def lalm_model(hf_checkpoint):
    """Factory: lalm_model(shape="gqa", seed=0) -> lalm's model loaded from the same checkpoint (fp32)."""
    import torch

    from lalm.weights import load_checkpoint

    cache = {}

    def get(shape: str = "gqa", seed: int = 0):
        if (shape, seed) not in cache:
            cache[shape, seed] = load_checkpoint(hf_checkpoint(shape, seed), dtype=torch.float32)
        return cache[shape, seed]

    return get


@pytest.fixture(scope="session")
def tiny(hf_checkpoint, tmp_path_factory):
    """lalm.LALM (fp32) on the "gqa" reference checkpoint, with a tokenizer whose specials sit
    at the reference ids (test_generate.load_tiny); shared by the inference tests."""
    from test_generate import load_tiny

    return load_tiny(hf_checkpoint, tmp_path_factory)


@pytest.fixture(scope="session")
def hf(hf_model):
    """transformers' model on the same "gqa" checkpoint as `tiny`."""
    return hf_model("gqa")
