"""The eval report: a per-source table (Markdown + JSON) beside the paper's figures, and a chart.

The paper's numbers are Table 2 of Chu et al. 2024 and the "HF-converted" column of the
official README (spec section 7), keyed by the source names the adapters emit. WER is shown
in percent in the table and chart (as the paper prints it); the JSON keeps the fraction the
official script prints, plus the percent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lalm.eval import metrics

# source -> (label, metric, paper, HF-converted)
PAPER_TABLE2: dict[str, tuple[str, str, float, float]] = {
    "librispeech_dev_clean": ("LibriSpeech dev-clean", "wer", 1.3, 1.7),
    "librispeech_dev_other": ("LibriSpeech dev-other", "wer", 3.4, 3.6),
    "librispeech_test_clean": ("LibriSpeech test-clean", "wer", 1.6, 1.7),
    "librispeech_test_other": ("LibriSpeech test-other", "wer", 3.6, 4.0),
    "cv15_en": ("Common Voice 15 en", "wer", 8.6, 8.7),
    "cv15_zh": ("Common Voice 15 zh", "wer", 6.9, 6.5),
    "cv15_yue": ("Common Voice 15 yue", "wer", 5.9, 5.9),
    "cv15_fr": ("Common Voice 15 fr", "wer", 9.6, 9.6),
    "fleurs_zh": ("FLEURS zh", "wer", 7.5, 7.0),
    "aishell2_mic_test": ("AISHELL-2 Mic", "wer", 3.0, 3.2),
    "aishell2_ios_test": ("AISHELL-2 iOS", "wer", 3.0, 3.1),
    "aishell2_android_test": ("AISHELL-2 Android", "wer", 2.9, 2.9),
    "covost2_en_de_test": ("CoVoST2 en-de", "bleu", 29.9, 29.6),
    "covost2_de_en_test": ("CoVoST2 de-en", "bleu", 35.2, 33.6),
    "covost2_en_zh_test": ("CoVoST2 en-zh", "bleu", 45.2, 45.6),
    "covost2_zh_en_test": ("CoVoST2 zh-en", "bleu", 24.4, 24.0),
    "covost2_es_en_test": ("CoVoST2 es-en", "bleu", 40.0, 38.7),
    "covost2_fr_en_test": ("CoVoST2 fr-en", "bleu", 38.5, 37.2),
    "covost2_it_en_test": ("CoVoST2 it-en", "bleu", 36.3, 35.2),
    "meld_test": ("MELD test", "accuracy", 0.553, 0.535),
    "vocalsound_test": ("VocalSound test", "accuracy", 0.9392, 0.9395),
    "airbench_speech": ("AIR-Bench chat Speech", "score", 7.18, 7.24),
    "airbench_sound": ("AIR-Bench chat Sound", "score", 6.99, 6.83),
    "airbench_music": ("AIR-Bench chat Music", "score", 6.79, 6.73),
    "airbench_mixed": ("AIR-Bench chat Mixed", "score", 6.77, 6.42),
    # The AIR-Bench leaderboard's average (6.93); HF-converted: the mean of the four rows above.
    "airbench_average": ("AIR-Bench chat Average", "score", 6.93, 6.805),
}

_UNITS = {"wer": "WER %", "bleu": "BLEU", "accuracy": "ACC", "score": "GPT score"}


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (task, source): ours beside the paper's figures where the paper has the row."""
    rows = []
    for task, res in results.items():
        metric = metrics.primary_metric(task)
        per_source = dict(res.get("by_source", {}))
        if task in metrics.CHAT_TASKS:  # the paper reports AIR-Bench per category
            cats = res.get("metrics", {}).get("categories", {})
            per_source = {f"airbench_{c}": {"score": v} for c, v in cats.items()} | per_source
        for source, vals in per_source.items():
            ours = _num(vals.get(metric))
            if metric == "wer" and ours is not None:
                ours *= 100
            paper = PAPER_TABLE2.get(source)
            row = {"task": task, "source": source, "metric": _UNITS.get(metric, metric), "count": vals.get("count"),
                   "ours": ours, "paper": paper[2] if paper else None, "hf_converted": paper[3] if paper else None,
                   "label": paper[0] if paper else source}
            if "accuracy_lenient" in vals:
                row["ours_lenient"] = _num(vals["accuracy_lenient"])
            if vals.get("skipped"):
                row["skipped"] = vals["skipped"]
            rows.append(row)
    return rows


def _fmt(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if metric == "ACC" else f"{x:.2f}"


def markdown(results: dict[str, dict], title: str = "lalm eval") -> str:
    lines = [f"# {title}", ""]
    rows = table_rows(results)
    for task, res in results.items():
        m = res.get("metrics", {})
        overall = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in m.items() if not isinstance(v, dict))
        lines += [f"## {task}", "", f"Overall: {overall}", "",
                  "| source | n | metric | ours | lenient | paper | HF-converted |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["task"] == task):
            n = r["count"] if r["count"] is not None else "-"
            n = f"{n} ({r['skipped']} skipped)" if r.get("skipped") else n  # failed items: not scored
            lines.append(f"| {r['label']} | {n} | {r['metric']} | "
                         f"{_fmt(r['ours'], r['metric'])} | {_fmt(r.get('ours_lenient'), r['metric'])} | "
                         f"{_fmt(r['paper'], r['metric'])} | {_fmt(r['hf_converted'], r['metric'])} |")
        lines.append("")
        lines += _subset_lines(res)
    lines += [("Paper: Qwen2-Audio Table 2; HF-converted: the official README's second table. "
               "WER in percent; accuracy as a fraction."), ""]
    return "\n".join(lines)


def _subset_lines(res: dict) -> list[str]:
    """A source's records by kind of sentence or question (lalm's eval manifests carry a subset)."""
    by_subset = res.get("by_subset") or {}
    if not by_subset:
        return []
    lines = ["By subset:", "", "| source | subset | n | metric | ours |", "|---|---|---:|---|---:|"]
    for source, subsets in by_subset.items():
        for name, m in subsets.items():
            metric = next((k for k in ("wer", "bleu", "accuracy", "score") if k in m), None)
            value = _num(m.get(metric)) if metric else None
            if metric == "wer" and value is not None:
                value *= 100
            unit = _UNITS.get(metric, metric or "-")
            lines.append(f"| {source} | {name} | {m.get('count', '-')} | {unit} | {_fmt(value, unit)} |")
    return lines + [""]


def chart(results: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars per metric: ours, and the paper's figure where it exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table_rows(results) if r["ours"] is not None]
    kinds = list(dict.fromkeys(r["metric"] for r in rows)) or ["-"]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6, 0.9 * max(1, len(rows)) + 2), 3.2 * len(kinds)),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        sel = [r for r in rows if r["metric"] == kind]
        xs = list(range(len(sel)))
        if any(r["paper"] is not None for r in sel):
            ax.bar([x - 0.2 for x in xs], [r["ours"] for r in sel], width=0.4, label="lalm")
            ax.bar([x + 0.2 for x in xs], [r["paper"] or 0 for r in sel], width=0.4, label="paper (Table 2)")
            ax.legend(fontsize=8)
        else:  # lalm's own sets: nothing to compare with
            ax.bar(xs, [r["ours"] for r in sel], width=0.5, label="lalm")
        if kind == "ACC":
            ax.set_ylim(0, 1)
        ax.set_xticks(xs, [r["label"] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(kind)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(results: dict[str, dict], out_dir: str | Path, title: str = "lalm eval", info: dict | None = None) -> dict:
    """report.md, report.json and report.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "report.md", out / "report.json", out / "report.png"
    md.write_text(markdown(results, title), encoding="utf-8")
    js.write_text(json.dumps({"title": title, "info": info or {}, "tasks": results, "table": table_rows(results)},
                             indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    chart(results, png)
    return {"markdown": md, "json": js, "png": png}
