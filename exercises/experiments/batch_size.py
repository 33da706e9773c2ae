"""
Open experiment: how does the batch size change what CLIP learns, and why?

The contrastive loss asks each image to pick its caption among the B captions of its batch (CLIP, Radford et al.
2021, https://arxiv.org/abs/2103.00020, Figure 3), so the batch size sets how hard the task is: a guess is right
1 time in B, and the loss starts near log B. CLIP trained with B = 32,768 (section 2.5); SigLIP (Zhai et al. 2023,
https://arxiv.org/abs/2303.15343, section 4) measures how far that helps. This script trains the built-in Shapes
model at several batch sizes for the same number of images seen (the same compute), then plots validation recall
against B, and the training loss divided by log B against the images seen.

    python exercises/experiments/batch_size.py commands   # the train.py runs it makes (to run them anywhere)
    python exercises/experiments/batch_size.py run        # make them one after the other (2-4 min each)
    python exercises/experiments/batch_size.py plot       # OUT/batch_size.png and a table

Each run is plain CLIP (no hard negatives), its warmup a tenth of its steps; val recall is read from its
results_val.json, the loss from its metrics.jsonl. A finished run is skipped, an interrupted one resumed.
The questions to answer are in exercises/README.md.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # plot.py's reader of metrics.jsonl; run as a script, only this folder is on the path
from exercises.experiments.runs import act, finished_runs, pyplot  # noqa: E402
from plot import read_metrics  # noqa: E402

OUT = ROOT / "out" / "experiments" / "batch_size"


def train_args(batch_size, images, out):
    """train.py's flags for one run: `images` training images seen at this batch size."""
    steps = max(1, images // batch_size)
    return ["--batch-size", str(batch_size), "--max-steps", str(steps), "--warmup", str(max(1, steps // 10)),
            "--hard-negatives", "0", "--hard-negative-weight", "0", "--mine-every", "0", "--eval-every", "0",
            "--test-split", "", "--out", str(Path(out) / f"b{batch_size}")]


def read_runs(out, sizes):
    """{B: (val results, training step records)} for the runs that have finished."""
    runs = {}
    for b in sizes:
        run_dir = Path(out) / f"b{b}"
        if (run_dir / "results_val.json").exists():
            runs[b] = json.loads((run_dir / "results_val.json").read_text()), read_metrics(run_dir / "metrics.jsonl")[0]
    return runs


def plot(out, sizes):
    """OUT/batch_size.png: val R@1 and R@5 against the batch size; loss / log B against the images seen."""
    plt = pyplot()
    runs = finished_runs(read_runs(out, sizes), out, "batch_size.py")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bs = sorted(runs)
    for direction, style in (("text_to_image", "-"), ("image_to_text", "--")):
        for k in ("R@1", "R@5"):
            left.plot(bs, [100 * runs[b][0][direction][k] for b in bs], style, marker="o",
                      label=f"{direction.replace('_to_', '->')} {k}")
    left.set(xscale="log", xlabel="batch size B", ylabel="val recall (%)", title="same images seen, different B")
    left.set_xticks(bs, [str(b) for b in bs])
    left.legend(fontsize=8)
    for b in bs:
        steps = runs[b][1]
        right.plot([r["step"] * b for r in steps], [r["loss"] / math.log(b) for r in steps], lw=0.8, label=f"B={b}")
    right.set(xlabel="training images seen", ylabel="loss / log B (1 = chance)", title="training loss")
    right.legend(fontsize=8)
    fig.tight_layout()
    png = Path(out) / "batch_size.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"{'B':>5} {'T->I R@1':>9} {'I->T R@1':>9} {'final loss':>11} {'loss/log B':>11}")
    for b in bs:
        (results, steps), loss = runs[b], runs[b][1][-1]["loss"]
        print(f"{b:5d} {100 * results['text_to_image']['R@1']:9.2f} {100 * results['image_to_text']['R@1']:9.2f} "
              f"{loss:11.3f} {loss / math.log(b):11.3f}")
    print(f"plot: {png}")
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("action", choices=["commands", "run", "plot"], help="print the train.py commands, run them, or plot")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="the batch sizes")
    p.add_argument("--images", type=int, default=20000, help="training images seen by every run (2 epochs of Shapes)")
    p.add_argument("--out", default=str(OUT), help="the runs go to OUT/b16, OUT/b32, ...")
    args = p.parse_args(argv)
    runs = [(f"b{b}", train_args(b, args.images, args.out), Path(args.out) / f"b{b}") for b in args.sizes]
    act(args.action, runs, "results_val.json", lambda: plot(args.out, args.sizes))


if __name__ == "__main__":
    main()
