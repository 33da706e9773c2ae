"""What the open experiments share: their three actions (print the train.py commands, run them, plot), and running
train.py once per run, in order, skipping finished runs and resuming interrupted ones, so `run` can be stopped and
started again at any time."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_runs(runs, finished):
    """runs: [(name, train.py flags, run folder)]; a run whose folder holds the file `finished` is skipped."""
    for name, flags, run_dir in runs:
        if (Path(run_dir) / finished).exists():
            print(f"{name}: done already ({run_dir})")
            continue
        resume = ["--resume"] if (Path(run_dir) / "last.pt").exists() else []
        print(f"{name}: python train.py {' '.join(flags + resume)}", flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "train.py")] + flags + resume)
        if done.returncode:
            sys.exit(f"error: train.py stopped with exit status {done.returncode} for {name} (its output is above)")


def act(action, runs, finished, plot):
    """action "commands": print each run's train.py command; "run": train_runs, then plot(); "plot": plot()."""
    if action == "commands":
        for _, flags, _ in runs:
            print("python train.py " + " ".join(f or "''" for f in flags))
        return None
    if action == "run":
        train_runs(runs, finished)
    return plot()


def pyplot():
    """matplotlib's pyplot on its file-only backend (the plots are PNG files; no display is needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finished_runs(runs, out, script):
    """runs as read from OUT, or exit with one line saying how to make them."""
    if not runs:
        sys.exit(f"error: no finished run under {out}/ (python exercises/experiments/{script} run)")
    return runs
