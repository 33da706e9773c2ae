"""
Plots a training run's metrics.jsonl (written by train.py): the contrastive loss, the learning rate and the
logit scale per step, and the validation recall@k at each evaluation.

    python plot.py out/shapes/metrics.jsonl out/shapes/metrics.png
"""
import json
import sys
from pathlib import Path


def read_metrics(path):
    steps, evals = [], []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            steps.append(r)
        elif "val" in r and isinstance(r["step"], int):
            evals.append((r["step"], r["val"]))
    return steps, evals


def plot_metrics(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    steps, evals = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = [r["step"] for r in steps]
    axes[0].plot(x, [r["loss"] for r in steps], lw=0.8)
    axes[0].set(title="symmetric InfoNCE loss", xlabel="step", yscale="log")
    axes[1].plot(x, [r["logit_scale"] for r in steps], label="logit scale (1/temperature)")
    peak = max(r["lr"] for r in steps)
    axes[1].plot(x, [r["lr"] / peak * 100 for r in steps], label="lr (% of peak)")
    axes[1].set(title="temperature and learning rate", xlabel="step")
    axes[1].legend()
    for direction, style in (("text_to_image", "-"), ("image_to_text", "--")):
        for k in ("R@1", "R@5", "R@10"):
            axes[2].plot([s for s, _ in evals], [100 * v[direction][k] for _, v in evals], style, marker=".",
                         label=f"{direction.replace('_to_', '->')} {k}")
    axes[2].set(title="validation recall (%)", xlabel="step", ylim=(0, 100))
    if evals:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python plot.py METRICS.jsonl OUT.png")
    print(plot_metrics(sys.argv[1], sys.argv[2]))
