"""Learning curves of a run: train reward (rolling mean) and held-out eval per round vs step.

Usage: python bench/plot_curves.py runs/shapes_cpu/metrics.jsonl bench/shapes_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(metrics_path: Path, out: Path, window: int = 10) -> None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in sorted({r["stage"] for r in rows if "stage" in r}):
        pts = [(r["step"], r["reward/mean"]) for r in rows if r.get("stage") == stage and r.get("reward/mean") is not None]
        if not pts:
            continue
        steps, vals = zip(*pts)
        smooth = [sum(vals[max(0, i - window + 1): i + 1]) / len(vals[max(0, i - window + 1): i + 1]) for i in range(len(vals))]
        ax_train.plot(steps, smooth, label=f"{stage} reward (rolling {window})")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel("reward/mean")
    ax_train.legend()
    evals = [r for r in rows if "eval/final_mean" in r]
    k = 0
    while any(f"eval/round{k}_mean" in r for r in evals):
        ax_eval.plot([r["step"] for r in evals], [r[f"eval/round{k}_mean"] for r in evals], marker="o", label=f"round {k}")
        k += 1
    ax_eval.plot([r["step"] for r in evals], [r["eval/final_mean"] for r in evals], "k--", marker="s", label="final")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel("held-out checker score")
    ax_eval.legend()
    fig.suptitle(str(metrics_path.parent.name))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
