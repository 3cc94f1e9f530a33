"""Where training numbers go: OUT/metrics.jsonl (one line per step), TensorBoard, a PNG at the end.

Only rank 0 writes. On `--resume` the lines past the resumed step are dropped first, so the file
(and the curve drawn from it) is the one an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything after it is gone too
    return rows


class MetricsWriter:
    def __init__(self, out: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / METRICS_FILE
        if resume_step:
            kept = [r for r in read_metrics(self.out) if r.get("step", 0) <= resume_step]
            self._rewrite(kept)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is the `train` extra; metrics.jsonl still works
                pass
            else:
                # purge_step hides events a killed run logged past the checkpoint we resume from.
                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(out: str | Path, title: str = "") -> Path | None:
    """Draw OUT/loss.png from metrics.jsonl: training loss (and eval loss / DPO margins if logged)."""
    rows = read_metrics(out)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    panels = [("loss", "eval_loss"), ("reward_margin", "eval_reward_margin"), ("accuracy", "eval_accuracy")]
    panels = [p for p in panels if any(k in r for r in rows for k in p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(keys[0])
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(out) / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
