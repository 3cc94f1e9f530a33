"""Regression tests from an audit of generation (lalm.generate, lalm.beam, LALM.generate/stream).

Run: .venv/bin/pytest -x -q tests/test_generate_audit.py

Each test failed before its fix:
- sampling on a CUDA model drew with the row's CPU generator from CUDA probabilities, which
  torch refuses ("Expected a 'cuda' device type for generator but found 'cpu'");
- a generation_config.json with do_sample and num_beams > 1 (beam sampling in transformers)
  made every options() call raise, even with the clash overridden;
- an empty raw prompt crashed with a bare ValueError alone, and in a batch silently decoded
  from a padding token;
- stop_token_ids=<one id> (as transformers takes eos_token_id) raised a TypeError; a bare stop
  string given to SamplingOptions became one stop string per character; a negative stop id
  masked the vocabulary's last token under min_new_tokens.
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch

pytest.importorskip("transformers")
from test_generate import CONVERSATIONS

import lalm
from lalm import generate as gen
from lalm.errors import ChatFormatError, ConfigError

# ------------------------------------------------------------ sampling device


def test_sampling_draws_on_the_generators_device(monkeypatch):
    """Row generators are CPU generators; torch.multinomial wants its input on the generator's
    device (on CUDA it raises otherwise). Here a stand-in generator on another device and a
    multinomial that checks devices as torch's does reproduce that on a CPU-only machine."""
    real = torch.multinomial
    seen = []

    def multinomial(probs, n, generator=None):
        if generator is not None and probs.device.type != generator.device.type:
            raise RuntimeError(f"Expected a '{probs.device.type}' device type for generator "
                               f"but found '{generator.device.type}'")
        seen.append(probs.device.type)
        return real(torch.ones(3), n)  # the meta tensor has no values to draw from

    monkeypatch.setattr(torch, "multinomial", multinomial)
    other = types.SimpleNamespace(device=torch.device("meta"))  # a generator off the logits' device
    token = gen.sample(torch.randn(50), gen.SamplingOptions(temperature=0.8), generator=other)
    assert seen == ["meta"] and 0 <= token < 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_sampling_on_cuda_equals_cpu():
    """The real case: CUDA logits, a seeded CPU generator (as Row makes) -> the CPU's draws."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3
    o = gen.SamplingOptions(temperature=0.9, top_k=40, top_p=0.9, seed=7)

    def draws(x):
        g = torch.Generator().manual_seed(7)
        return [gen.sample(x, o, g) for _ in range(8)]

    assert draws(logits.cuda()) == draws(logits)


# ------------------------------------------------------------ generation_config.json


def test_generation_config_beam_sampling_still_generates(tiny, tmp_path):
    """transformers reads do_sample + num_beams > 1 as beam sampling, which lalm does not do:
    a call that samples decodes one sequence (the checkpoint's beams give way, as they do for
    an explicit temperature), temperature 0 runs the checkpoint's beams."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.path, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.5, num_beams=3)
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    lm = lalm.load(folder, dtype=torch.float32)
    o = lm.options()
    assert (o.temperature, o.top_k, o.top_p, o.num_beams) == (0.7, 20, 0.5, 1)
    assert lm.options(temperature=0).num_beams == 3 and lm.options(num_beams=1).num_beams == 1
    with pytest.raises(ConfigError, match="temperature=0.7"):
        lm.options(num_beams=3)  # asked for explicitly: beams with sampling are still refused
    conv = CONVERSATIONS["voice_only"]
    (a,) = lm.generate(conv, max_new_tokens=5, min_new_tokens=5, seed=3)
    assert len(a.token_ids) == 5
    (b,) = lm.generate(conv, max_new_tokens=8, temperature=0)
    assert b.token_ids == tiny.generate(conv, max_new_tokens=8, num_beams=3)[0].token_ids


# ------------------------------------------------------------ empty prompts


@pytest.mark.parametrize("prompt", ["", {"prompt": "", "audios": []}])
def test_an_empty_raw_prompt_is_a_typed_error(tiny, prompt):
    with pytest.raises(ChatFormatError, match="empty"):
        tiny.generate(prompt, max_new_tokens=3)
    with pytest.raises(ChatFormatError, match="empty"):
        tiny.generate([CONVERSATIONS["text_only"], prompt], max_new_tokens=3)
    with pytest.raises(ChatFormatError, match="empty"):
        list(tiny.stream(prompt, max_new_tokens=3))


def test_the_decoder_refuses_an_empty_row(tiny):
    """DecodeState (the server's engine) and beam search check the batch themselves too."""
    from lalm import beam
    from lalm.processor import collate

    ok = tiny.prepare(CONVERSATIONS["text_only"])
    empty = type(ok)(ids=ok.ids[:0], loss_mask=ok.loss_mask[:0], mels=[], frames=[], audio_tokens=0)
    batch = collate([ok, empty], tiny.tokenizer.pad_id)
    with pytest.raises(ChatFormatError, match="prompt 1 is empty"):
        gen.DecodeState.start(tiny.model, batch, [gen.Row(), gen.Row()])
    with pytest.raises(ChatFormatError, match="prompt 1 is empty"):
        beam.search(tiny.model, batch, tiny.options(num_beams=2))


# ------------------------------------------------------------ stop options


def test_one_stop_token_id_and_malformed_stop_options(tiny):
    conv = CONVERSATIONS["single"]
    (free,) = tiny.generate(conv, max_new_tokens=8, temperature=0)
    stop_at = free.token_ids[3]
    (r,) = tiny.generate(conv, max_new_tokens=8, temperature=0, stop_token_ids=stop_at)
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    with pytest.raises(ConfigError, match="stop='END'"):
        gen.SamplingOptions(stop="END")  # not the stop strings "E", "N" and "D"
    for bad in [(-1,), (1.5,), 7]:  # -1 would mask logits[-1], the last id, under min_new_tokens
        with pytest.raises(ConfigError, match="stop_token_ids"):
            gen.SamplingOptions(stop_token_ids=bad)
