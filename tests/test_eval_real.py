"""`lalm eval` on a real (random, tiny) checkpoint: batch size does not change greedy predictions.

The checkpoint is built here from lalm's own pieces (tiny preset, a small BPE tokenizer),
so the test needs neither transformers nor a download.
Run: .venv/bin/pytest -q tests/test_eval_real.py
"""

import json

import numpy as np
import pytest
import soundfile as sf

from lalm.__main__ import main
from lalm.eval import adapters
from lalm.eval.runner import RunConfig, generate_predictions

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    try:
        from lalm.config import ModelConfig
        from lalm.model import Qwen2AudioForConditionalGeneration
        from lalm.tokenizer import train_bpe
        from lalm.weights import save_checkpoint
    except ImportError as e:  # the model side not there yet
        pytest.skip(f"lalm model API unavailable: {e}")
    from wordfreq import top_n_list

    words = top_n_list("en", 2000)
    tok = train_bpe([" ".join(words[i : i + 10]) for i in range(0, len(words), 5)], 384)
    config = ModelConfig.preset("test-tiny", text={"vocab_size": tok.vocab_size, "bos_token_id": tok.endoftext_id,
                                              "eos_token_id": tok.im_end_id}, audio_token_index=tok.audio_id)
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    with torch.no_grad():  # larger weights than the default init: outputs then depend on the audio
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-eval") / "ckpt"
    save_checkpoint(model, folder)
    tok.save(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.endoftext_id, tok.im_end_id], "pad_token_id": tok.endoftext_id, "do_sample": False}))
    return folder


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    """Five utterances of different lengths, so batches are left padded."""
    root = tmp_path_factory.mktemp("ls")
    chap = root / "LibriSpeech" / "test-other" / "7" / "8"
    chap.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, seconds in enumerate([0.3, 1.1, 0.6, 2.0, 0.9]):
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (150 + 100 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(chap / f"7-8-{i:04d}.flac", wave.astype(np.float32), 16000)
        lines.append(f"7-8-{i:04d} SOME WORDS {i}\n")
    (chap / "7-8.trans.txt").write_text("".join(lines))
    return root


@pytest.mark.parametrize("style", ["base", "instruct"])
def test_batch_size_does_not_change_greedy_predictions(tiny_checkpoint, librispeech, tmp_path, style):
    import lalm

    lm = lalm.load(tiny_checkpoint, dtype="float32")
    items = adapters.load(librispeech)
    preds = {}
    for bs in (1, 4):
        cfg = RunConfig(batch_size=bs, max_new_tokens=12, prompt_style=style, progress=False)
        recs = generate_predictions(lm, items, tmp_path / f"{style}-{bs}.jsonl", cfg)
        preds[bs] = [r["prediction"] for r in recs]
    assert len(preds[1]) == 5 and len(set(preds[1])) >= 3  # the audio changes the answer
    assert preds[1] == preds[4]


def test_eval_command_end_to_end(tiny_checkpoint, librispeech, tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--data", str(librispeech), "--output", str(out),
               "--batch-size", "4", "--max-new-tokens", "6", "--prompt-style", "base", "--no-progress",
               "--dtype", "float32", "--limit", "3"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    src = rep["tasks"]["asr"]["by_source"]["librispeech_test_other"]
    assert src["count"] == 3 and src["wer"] >= 0.5  # a random model does not transcribe
    row = next(r for r in rep["table"] if r["source"] == "librispeech_test_other")
    assert (row["paper"], row["hf_converted"]) == (3.6, 4.0)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
