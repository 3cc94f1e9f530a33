"""Evaluation: the paper's benchmarks and lalm's own tasks, scored exactly as the official scripts.

normalize.py  the official ASR normaliser chain (remove_sp, Whisper normalisers, cn_tn, tokenizer)
metrics.py    WER/CER, BLEU, exact and lenient accuracy, short-answer match; per source
prompts.py    the base model's official prompts per task, and Instruct variants
adapters.py   readers for the released benchmark layouts and lalm eval manifests
judge.py      the AIR-Bench chat judge over any OpenAI-compatible endpoint
runner.py     generate (restartable, data-parallel) then score
report.py     Markdown + JSON table beside the paper's Table 2, and a PNG chart
cli.py        `lalm eval`
"""
