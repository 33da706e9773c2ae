"""
Open experiment: make the model learn shape, and word order.

In a random batch of Shapes captions the colour words alone pick the right caption, so plain contrastive training
never needs shape, attribute binding or word order, and does not learn them (the ARO benchmark of Yuksekgonul et al.
2023, https://arxiv.org/abs/2210.01936, asks the same of real CLIPs). NegCLIP (section 5 there) adds hard-negative
captions, the true caption with one thing changed (negatives.py), as extra columns of the loss; SVLC's loss (Doveh et
al. 2023, https://arxiv.org/abs/2211.11733, section 3.3), losses.hard_negative_loss, ranks each image's caption above
its own negatives. This script trains four variants for the same number of steps and plots the probe: zero-shot
questions about new scenes whose answers differ only in the probed words (probe.py).

    python exercises/experiments/hard_negatives.py commands   # the train.py runs it makes (to run them anywhere)
    python exercises/experiments/hard_negatives.py run        # make them one after the other (~4 min each)
    python exercises/experiments/hard_negatives.py plot       # OUT/hard_negatives.png and a table

The measure: probe accuracy per task (probe.json of each run) against chance, and val R@1 (results_val.json).
A finished run is skipped, an interrupted one resumed. The questions to answer are in exercises/README.md.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script, only this folder is on the path
from exercises.experiments.runs import act, finished_runs, pyplot  # noqa: E402

OUT = ROOT / "out" / "experiments" / "hard_negatives"
VARIANTS = {  # name -> train.py flags
    "plain": ["--hard-negatives", "0", "--hard-negative-weight", "0"],  # CLIP's loss alone
    "negclip": ["--hard-negative-weight", "0"],  # 3 hard negatives per caption, extra columns of clip_loss
    "negclip+loss": [],  # the same plus hard_negative_loss at weight 2 (train.py's default)
    "shape-only": ["--negative-kinds", "shape"],  # only negatives with a shape word changed, with the loss
}
TASKS = ["shape", "colour", "size", "position", "count", "binding", "relation"]


def train_args(variant, steps, out):
    return VARIANTS[variant] + ["--max-steps", str(steps), "--eval-every", "0", "--test-split", "",
                                "--out", str(Path(out) / variant)]


def read_runs(out, variants):
    """{variant: (probe results, val results)} for the runs that have finished."""
    runs = {}
    for v in variants:
        run_dir = Path(out) / v
        if (run_dir / "probe.json").exists() and (run_dir / "results_val.json").exists():
            runs[v] = json.loads((run_dir / "probe.json").read_text()), \
                json.loads((run_dir / "results_val.json").read_text())
    return runs


def plot(out, variants):
    """OUT/hard_negatives.png: probe accuracy per task and variant, chance marked."""
    plt = pyplot()
    runs = finished_runs(read_runs(out, variants), out, "hard_negatives.py")
    names, width = list(runs), 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, v in enumerate(names):
        ax.bar([t + i * width for t in range(len(TASKS))], [runs[v][0][task]["accuracy"] for task in TASKS], width,
               label=v)
    first = runs[names[0]][0]
    for t, task in enumerate(TASKS):  # chance: 1 in the number of candidate captions
        ax.hlines(first[task]["chance"], t - width / 2, t + (len(names) - 0.5) * width, colors="k", linestyles=":")
    ax.set_xticks([t + (len(names) - 1) * width / 2 for t in range(len(TASKS))], TASKS)
    ax.set(ylabel="zero-shot probe accuracy (%)", ylim=(0, 100), title="what each loss teaches (dotted: chance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(out) / "hard_negatives.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    print(f"{'variant':14s}" + "".join(f"{t:>9s}" for t in TASKS) + f"{'T->I R@1':>10s}{'I->T R@1':>10s}")
    for v in names:
        probe, val = runs[v]
        print(f"{v:14s}" + "".join(f"{probe[t]['accuracy']:9.1f}" for t in TASKS)
              + f"{100 * val['text_to_image']['R@1']:10.2f}{100 * val['image_to_text']['R@1']:10.2f}")
    print(f"plot: {png}")
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("action", choices=["commands", "run", "plot"], help="print the train.py commands, run them, or plot")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which runs")
    p.add_argument("--max-steps", type=int, default=400, help="training steps of every run (batch 128)")
    p.add_argument("--out", default=str(OUT), help="the runs go to OUT/plain, OUT/negclip, ...")
    args = p.parse_args(argv)
    runs = [(v, train_args(v, args.max_steps, args.out), Path(args.out) / v) for v in args.variants]
    act(args.action, runs, "probe.json", lambda: plot(args.out, args.variants))


if __name__ == "__main__":
    main()
