"""`lalm demo`'s evaluation and presentation: held-out scores against the targets, DPO before and
after, plots, example turns and the commands to use the model.

The scores come from the same code as `lalm eval --model HOME/demo/model --data HOME/corpus/eval`
(adapters -> runner -> metrics), run in-process. DPO's effect is measured on what it targets:
the preference dev set's prompts answered by the SFT and the DPO model (decoded as the recipe's
`num_beams` says, both alike), counting answers
equal to the chosen one, equal to the rejected one, and their length; plus the voice-chat
accuracy of both models and the dev reward accuracy the DPO run logged.
"""

from __future__ import annotations

import json
from pathlib import Path

# eval set -> (label, metric, target, "<=" or ">=")
TARGETS = {
    "asr_piper": ("ASR, unseen Piper voice (WER %)", "wer", 15.0, "<="),
    "asr_real": ("ASR, real human speech (WER %)", "wer", 35.0, "<="),
    "voice_chat_piper": ("Voice chat, spoken question only (acc %)", "accuracy", 70.0, ">="),
    "coarse": ("Coarse type: speech/music/sound (acc %)", "accuracy", 90.0, ">="),
    "sound": ("Sound event, held-out files (acc %)", "accuracy", None, ">="),
}


def _score(results: dict, source: str) -> float | None:
    """The primary metric of one eval set in percent (WER and accuracy alike)."""
    for res in results.values():
        row = res.get("by_source", {}).get(source)
        if row is None:
            continue
        for key in ("wer", "accuracy"):
            if isinstance(row.get(key), (int, float)):
                return 100.0 * float(row[key])
    return None


def _norm(text: str) -> str:
    from lalm.eval.normalize import english_normalize

    return english_normalize(text).strip()


def preference_eval(lm, records: list[dict], batch_size: int, max_new_tokens: int, num_beams: int = 1) -> dict:
    """The model's answers (greedy, or beam search) to the preference dev prompts: share equal to
    chosen / rejected, mean words."""
    convs = [r["messages"] for r in records]
    outs = []
    for i in range(0, len(convs), batch_size):
        outs += [g.text for g in lm.generate(convs[i: i + batch_size], max_new_tokens=max_new_tokens,
                                             temperature=0, num_beams=num_beams)]
    n = max(len(records), 1)
    chosen = sum(_norm(o) == _norm(r["chosen"]) for o, r in zip(outs, records))
    rejected = sum(_norm(o) == _norm(r["rejected"]) for o, r in zip(outs, records))
    return {"items": len(records), "chosen_pct": 100.0 * chosen / n, "rejected_pct": 100.0 * rejected / n,
            "mean_words": sum(len(o.split()) for o in outs) / n,
            "examples": [{"prompt_task": r.get("task"), "chosen": r["chosen"], "rejected": r["rejected"],
                          "answer": o} for o, r in list(zip(outs, records))[:5]]}


def run_eval(p, out: Path) -> None:
    """Score the final model on every held-out eval set, and SFT vs DPO on what DPO targets."""
    import lalm
    from lalm.data.manifest import load_records
    from lalm.eval import adapters, report
    from lalm.eval.runner import RunConfig, generate_predictions, score_records
    from lalm.train.metrics import read_metrics

    r = p.recipe
    out.mkdir(parents=True, exist_ok=True)
    items = adapters.load(p.corpus / "eval", limit=r.eval_limit or None)
    cfg = RunConfig(batch_size=r.eval_batch_size, max_new_tokens=r.eval_max_new_tokens, progress=p.progress,
                    num_beams=r.num_beams)
    print(f"[eval] {len(items)} held-out items (lalm eval --model {p.model_dir} --data {p.corpus / 'eval'})")
    lm = lalm.load(p.model_dir)
    results = score_records(generate_predictions(lm, items, out / "predictions.jsonl", cfg))
    report.write(results, out, title="lalm-tiny on the held-out dev sets",
                 info={"model": str(p.model_dir), "data": str(p.corpus / "eval"), "items": len(items)})

    # DPO before/after: the SFT model is the DPO reference.
    sft = lalm.load(p.demo / "runs" / "sft" / "final")
    pref = load_records(p.demo / "data" / "dpo" / "dev.jsonl")
    dpo = {"after": preference_eval(lm, pref, r.eval_batch_size, r.eval_max_new_tokens, r.num_beams),
           "before": preference_eval(sft, pref, r.eval_batch_size, r.eval_max_new_tokens, r.num_beams),
           "num_beams": r.num_beams}
    chat_items = [it for it in items if it.source == "voice_chat_piper"]
    if chat_items:
        before = score_records(generate_predictions(sft, chat_items, out / "sft_voice_chat.jsonl", cfg))
        dpo["voice_chat_before"] = _score(before, "voice_chat_piper")
        dpo["voice_chat_after"] = _score(results, "voice_chat_piper")
    rows = [m for m in read_metrics(p.demo / "runs" / "dpo") if "eval_accuracy" in m]
    if rows:
        dpo["dev_reward_accuracy_first"] = rows[0]["eval_accuracy"]
        dpo["dev_reward_accuracy_last"] = rows[-1]["eval_accuracy"]
        dpo["dev_reward_margin_last"] = rows[-1]["eval_reward_margin"]
        if "eval_prefers_chosen" in rows[-1]:
            dpo["dev_prefers_chosen_last"] = rows[-1]["eval_prefers_chosen"]
            dpo["dev_prefers_chosen_ref"] = _ref_prefers_chosen(p)
    (out / "results.json").write_text(json.dumps({"results": results, "dpo": dpo}, indent=1, default=str))


def _ref_prefers_chosen(p) -> float:
    """Share of preference dev pairs the SFT model (DPO's reference) already ranks right: from the
    reference log-probs the DPO run computed once for its eval set (OUT/dpo_ref/eval.safetensors)."""
    from safetensors.torch import load_file

    from lalm.train import dpo_ref

    path = dpo_ref.cache_path(p.demo / "runs" / "dpo", "eval")
    if not path.is_file():
        return float("nan")
    ref = load_file(str(path))
    return float((ref["chosen"] > ref["rejected"]).double().mean()) if ref["chosen"].numel() else float("nan")


def results_table(results: dict) -> tuple[str, dict]:
    lines = ["| held-out eval set | lalm-tiny | target | met |", "|---|---|---|---|"]
    scores = {}
    for source, (label, _, target, op) in TARGETS.items():
        v = _score(results, source)
        scores[source] = v
        if v is None:
            continue
        ok = "" if target is None else ("yes" if (v <= target if op == "<=" else v >= target) else "no")
        t = "" if target is None else f"{op} {target:g}"
        lines.append(f"| {label} | {v:.1f} | {t} | {ok} |")
    return "\n".join(lines), scores


def subset_table(results: dict) -> str:
    """The held-out sets by kind of sentence, question or recording (the eval lines' `subset`):
    where the errors are, e.g. word-list sentences against template ones."""
    lines = ["| held-out eval set | kind | n | lalm-tiny |", "|---|---|---|---|"]
    for res in results.values():
        for source, subsets in (res.get("by_subset") or {}).items():
            label = TARGETS.get(source, (source,))[0]
            for name, m in subsets.items():
                key = "wer" if "wer" in m else "accuracy"
                if isinstance(m.get(key), (int, float)):
                    lines.append(f"| {label} | {name} | {m.get('count', '-')} | {100.0 * float(m[key]):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def dpo_table(dpo: dict) -> str:
    b, a = dpo.get("before", {}), dpo.get("after", {})
    k = dpo.get("num_beams", 1)
    how = "greedy answers" if k == 1 else f"answers, {k} beams"
    lines = [f"| preference dev set ({how}) | SFT (before DPO) | DPO (after) |", "|---|---|---|"]
    for key, label in (("chosen_pct", "answer = chosen (%)"), ("rejected_pct", "answer = rejected (%)"),
                       ("mean_words", "mean answer length (words)")):
        if key in a:
            lines.append(f"| {label} | {b.get(key, float('nan')):.1f} | {a[key]:.1f} |")
    if dpo.get("voice_chat_after") is not None:
        lines.append(f"| voice chat accuracy (%) | {dpo['voice_chat_before']:.1f} | {dpo['voice_chat_after']:.1f} |")
    if "dev_reward_accuracy_last" in dpo:  # before DPO the policy is the reference: every margin is 0
        lines.append(f"| dev pairs with reward margin > 0 (%) | 0.0 | {100 * dpo['dev_reward_accuracy_last']:.1f} |")
    if "dev_prefers_chosen_last" in dpo:
        lines.append(f"| dev pairs with log P(chosen) > log P(rejected) (%) | {100 * dpo['dev_prefers_chosen_ref']:.1f} "
                     f"| {100 * dpo['dev_prefers_chosen_last']:.1f} |")
    return "\n".join(lines)


def plot(p, scores: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lalm.train.metrics import read_metrics

    out = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, stage in zip(axes, ("pretrain", "sft", "dpo")):
        rows = read_metrics(p.demo / "runs" / stage)
        for key in ("loss", "eval_loss", "eval_reward_margin"):
            pts = [(m["step"], m[key]) for m in rows if key in m]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if key.startswith("eval") else None)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("lalm-tiny training curves")
    fig.tight_layout()
    path = p.demo / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)

    names = [s for s in TARGETS if scores.get(s) is not None]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    vals = [scores[s] for s in names]
    bars = ax.bar(range(len(names)), vals, color=["#4c72b0" if TARGETS[s][1] == "accuracy" else "#dd8452"
                                                  for s in names])
    for i, s in enumerate(names):
        target = TARGETS[s][2]
        if target is not None:
            ax.hlines(target, i - 0.4, i + 0.4, colors="k", linestyles="--")
        ax.text(i, vals[i] + 1, f"{vals[i]:.1f}", ha="center")
    ax.set_xticks(range(len(names)), [s.replace("_", "\n") for s in names])
    ax.set_ylabel("% (WER orange, accuracy blue; dashed = target)")
    ax.set_ylim(0, max(100, max(vals, default=0) + 10))
    ax.set_title("lalm-tiny on held-out dev sets")
    del bars
    fig.tight_layout()
    path = p.demo / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)
    return out


def examples(p) -> list[tuple]:
    """(kind, audio, question, reference, spoken question) of a few held-out turns to show."""
    from lalm.data.manifest import load_records

    ev = p.corpus / "eval"
    picks = []
    for name, kind in (("sound", "audio analysis"), ("asr_real", "audio analysis"),
                       ("voice_chat_piper", "voice chat")):
        f = ev / f"{name}.jsonl"
        if not f.is_file():
            continue
        recs = load_records(f)
        if recs:
            rec = recs[len(recs) // 2]
            parts = rec["messages"][-1]["content"]
            audio = next(x["audio"] for x in parts if x.get("type") == "audio")
            question = " ".join(x.get("text", "") for x in parts if x.get("type") == "text")
            picks.append((kind, audio, question, rec.get("reference", ""), rec.get("question")))
    return picks


def finish(p, saved: dict) -> None:
    import lalm

    results, dpo = saved["results"], saved.get("dpo", {})
    table, scores = results_table(results)
    print("\n== lalm-tiny on held-out dev sets (sources never used in training) ==\n" + table)
    kinds = subset_table(results)
    if kinds:
        print("\n== the same sets by kind of sentence, question or recording ==\n" + kinds)
    print("\n== DPO: before (SFT model) and after ==\n" + dpo_table(dpo))
    paths = plot(p, scores)
    (p.demo / "results.md").write_text(f"{table}\n\n{kinds + chr(10) * 2 if kinds else ''}{dpo_table(dpo)}\n")
    print("\nplots: " + "  ".join(str(x) for x in paths) + f"  {p.demo / 'eval' / 'report.png'}")

    print("\n== example turns (held-out audio) ==")
    lm = lalm.load(p.model_dir)
    for kind, audio, question, ref, spoken in examples(p):
        content = [{"type": "audio", "audio": audio}] + ([{"type": "text", "text": question}] if question else [])
        answer = lm.generate([[{"role": "user", "content": content}]], max_new_tokens=48)[0].text
        print(f"[{kind}] audio: {audio}")
        print(f"  user: <audio>{' ' + question if question else ''}"
              + (f'   (spoken: "{spoken}")' if spoken else ""))
        print(f"  lalm-tiny: {answer}")
        print(f"  reference: {ref}")
    print("\n== use it ==")
    print(f"  lalm chat --model {p.model_dir}")
    print(f"  lalm serve --model {p.model_dir}        # OpenAI-compatible API + web page")
    print(f"  lalm eval --model {p.model_dir} --data {p.corpus / 'eval'}")
    print(f"  {again_command(p)}                       # again: reuses the corpus and the checkpoint")


def again_command(p) -> str:
    """The command that reruns this demo and reuses its steps: `make demo` runs the plain recipe
    only, so a --quick, --threads, --device or --recipe run is named with its own flags."""
    from lalm.demo import RECIPE_DIR

    flags = (" --quick" if p.quick else "") \
        + (f" --threads {p.threads}" if p.threads is not None else "") \
        + (f" --device {p.device}" if p.device != "cpu" else "") \
        + (f" --recipe {p.recipe_dir}" if Path(p.recipe_dir).resolve() != RECIPE_DIR.resolve() else "")
    home = "" if p.home == _default_home() else f"LALM_HOME={p.home} "
    return f"{home}lalm demo{flags}" if flags else f"{home}make demo"


def _default_home() -> Path:
    from lalm.demo import default_home

    return default_home()
