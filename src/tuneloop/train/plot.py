"""loss.png: training and validation loss against the step."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#dd8452", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
