"""
Plots a training run's metrics.jsonl (written by train.py): the contrastive loss, the learning rate and the
logit scale per step, and the validation recall@k at each evaluation. Also the few-shot benchmark's reports
(adapters.py benchmark): results.csv, table.md and accuracy_vs_shots.png.

    python plot.py out/shapes/metrics.jsonl out/shapes/metrics.png
"""
import json
import sys
import warnings
from pathlib import Path

import torch

from runtime import plain_warnings

STEP_KEYS = ("step", "loss", "lr", "logit_scale")  # what train.py logs for every training step


def read_metrics(path):
    """metrics.jsonl -> (training step records, [(step, val recall)]). A run killed in the middle of writing a line
    leaves it torn: a last line that is not JSON is skipped, with a warning. Anything else fails, naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run's metrics.jsonl (train.py --out DIR writes one in DIR)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    steps, evals = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if n == len(lines):
                warnings.warn(f"{path}, line {n}: skipped a torn last line (the run stopped while writing it)")
                continue
            raise ValueError(f"{path}, line {n} is not JSON: {line[:40]!r}; plot.py reads the metrics.jsonl "
                             "that train.py writes") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}, line {n} is not a JSON object: {line[:40]!r}")
        if all(k in r for k in STEP_KEYS):
            steps.append(r)
        elif "val" in r and isinstance(r.get("step"), int):
            evals.append((r["step"], r["val"]))
    if not steps:
        raise ValueError(f"{path} has no training steps (lines with {', '.join(STEP_KEYS)}): pass the metrics.jsonl "
                         "of a train.py run that took at least one step")
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
    peak = max(r["lr"] for r in steps) or 1  # all zero: plot zeros rather than divide by zero
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


def summarise(rows, methods, shots):
    """rows: results dicts -> {(method, K): (mean %, std %, n)} of test accuracy over seeds."""
    table = {}
    for m in methods:
        for k in shots:
            accs = torch.tensor([100 * r["test_acc"] for r in rows if r["method"] == m and r["shots"] == k])
            if len(accs):
                table[m, k] = (accs.mean().item(), accs.std(unbiased=False).item(), len(accs))
    return table


def write_reports(rows, methods, shots, out, title):
    """The few-shot benchmark's results.csv (every run), table.md (mean +- std over seeds), accuracy_vs_shots.png;
    returns the markdown table."""
    out = Path(out)
    keys = ["method", "shots", "seed", "test_acc", "val_acc", "train_acc", "train_acc_zeroshot", "seconds"]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    table = summarise(rows, methods, shots)
    lines += ["", "method,shots,mean_test_acc,std_test_acc,seeds"]
    lines += [f"{m},{k},{v[0]:.2f},{v[1]:.2f},{v[2]}" for (m, k), v in table.items()]
    (out / "results.csv").write_text("\n".join(lines) + "\n")
    md = [f"{title}\n", "| method | " + " | ".join(f"{k}-shot" for k in shots) + " |",
          "|---|" + "---|" * len(shots)]
    for m in methods:
        md.append(f"| {m} | " + " | ".join(f"{table[m, k][0]:.1f} ± {table[m, k][1]:.1f}" if (m, k) in table else "–"
                                           for k in shots) + " |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        ks = [k for k in shots if (m, k) in table]
        mean, std = torch.tensor([table[m, k][0] for k in ks]), torch.tensor([table[m, k][1] for k in ks])
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=m, linestyle="--" if m == "zeroshot" else "-",
                    color=plt.cm.tab20(methods.index(m) % 20))  # the default cycle has 10 colours
    ax.set(xscale="log", xlabel="shots per class", ylabel="test accuracy (%)")
    ax.set_title(title.replace(", mean", "\nmean"), fontsize=9)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_shots.png", dpi=120)
    plt.close(fig)
    return "\n".join(md)


def main(argv=None):
    """python plot.py METRICS.jsonl OUT.png; a bad file is one line "error: ..." and exit status 1."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python plot.py METRICS.jsonl OUT.png")
    plain_warnings()
    try:
        print(plot_metrics(*argv))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
