"""
A training run's folder (OUT/ of train.py), kept safe: one run at a time holds it (a lock); the checkpoint holds
everything needed to continue exactly, and the one it replaced is kept; --resume reads it back (falling back to the
previous one if it is damaged) and takes the run's settings from it; the metrics log is trimmed to the last save;
Ctrl-C saves before stopping.

The checkpoint is nanoGPT's (model, optimizer, model config, step, run config; karpathy/nanoGPT train.py), plus the
RNG states and the data order position, so that a resumed run is bit-identical to an uninterrupted one.
"""
import argparse
import hashlib
import json
import os
import random
import signal
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import CheckpointError, save_checkpoint, torch_load
from shards import expand_shards, is_shards

# what defines a run: --resume takes them from the checkpoint
RUN_KEYS = ("config", "init", "data", "images", "train_split", "epochs", "max_steps", "batch_size", "lr", "wd",
            "warmup", "grad_clip", "seed", "precision", "hard_negatives", "text_lr_scale",
            "negative_kinds", "hard_negative_weight", "mine_every", "loss", "lock_image", "lock_text", "label_prompts",
            "label_prompt_weight")
SHARD_KEYS = ("workers",)  # tar shards (shards.py): the batches also depend on the number of DataLoader workers
BEFORE_KEY = {"hard_negatives": 0, "text_lr_scale": 1.0, "negative_kinds": "shape,colour,size,binding,order,place",
              "hard_negative_weight": 0.0, "mine_every": 0, "loss": "clip", "label_prompts": "",
              "label_prompt_weight": 0.0}  # the value a run saved before that key existed had
# --resume keeps these unless typed again (how often to save and evaluate, and how a step fits in memory)
SCHEDULE_KEYS = ("save_every", "eval_every", "val_split", "test_split", "accum_chunks", "grad_checkpointing")


def save_state(path, model, optimizer, scaler, step, run, odds=None):
    """Everything needed to continue exactly: weights + config (checkpoints.save_checkpoint), optimizer moments,
    scaler, step, RNG states, the run's settings and the mined odds of hard negatives (train.py: {kind: tensor}).
    Tensors and plain containers only (weights_only-safe). The checkpoint it replaces is kept as last.prev.pt, for
    when last.pt cannot be read back."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        save_checkpoint(path, model, keep_previous=True, step=step, optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict(), rng=rng, args=run, odds=dict(odds or {}),
                        scheduler={"name": "cosine", "peak_lr": run["lr"], "warmup": run["warmup"],
                                   "total_steps": run["total_steps"]})
    except OSError as e:  # e.g. a full disk: the message says which file still holds the previous save
        raise ValueError(f"at step {step}: {e}") from None


def read_run_checkpoint(path):
    """OUT/last.pt for --resume; if it is unreadable (a truncated or empty file) or not a train.py checkpoint, the
    previous one, last.prev.pt, with a message."""
    problems = []
    for candidate in (path, path.with_suffix(".prev.pt")):
        if not candidate.exists():
            continue
        try:
            ckpt = torch_load(candidate)
            missing = [k for k in ("model", "optimizer", "scaler", "step", "rng", "args") if k not in ckpt]
            if missing:
                raise CheckpointError(f"{candidate} is not a train.py checkpoint (no {', '.join(missing)})")
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from {candidate} (step {ckpt['step']}) instead")
        return ckpt
    if not problems:
        raise ValueError(f"--resume: {path} does not exist (run without --resume to start)")
    raise ValueError(f"--resume: no readable checkpoint: {'; '.join(problems)}")


def restore_state(ckpt, model, optimizer, scaler):
    model.load_state_dict(ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # e.g. saved by an edited train.py whose settings made other parameter groups
        raise ValueError(f"--resume: the checkpoint's optimizer state does not fit this run's optimizer ({e}); it "
                         "was saved by another version of train.py or with other settings: start a new run from its "
                         "weights with --init OUT/last.pt --out NEW_OUT") from e
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def file_digest(path):
    """SHA-256 of a file's bytes, read 1 MiB at a time (a checkpoint or a caption file need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_digest(data):
    """What --resume checks is unchanged: a caption file's SHA-256, or for tar shards (shards.py; too big to read
    again) the SHA-256 of their names and sizes."""
    if is_shards(data):
        listing = "".join(f"{p.name} {p.stat().st_size}\n" for p in expand_shards(data))
        return hashlib.sha256(listing.encode()).hexdigest()
    return file_digest(data)


def resumed_args(args, argv, saved, world):
    """--resume continues OUT/last.pt as the same run: what defines it (data, model, schedule) comes from the
    checkpoint; a defining flag typed on this command line with another value is reported and ignored. (To train
    longer with another schedule, start a new run with --init OUT/last.pt instead.) How often to save and evaluate,
    and how a step fits in memory (--accum-chunks, --grad-checkpointing), also come from the checkpoint, unless
    typed again."""
    typed = {key for key in vars(args) if any(a == "--" + key.replace("_", "-") or
                                              a.startswith("--" + key.replace("_", "-") + "=") for a in argv)}
    if saved.get("world", world) != world:
        raise ValueError(f"--resume: the run was trained by {saved['world']} process(es), this is {world}; "
                         "the global batch and the data order would change")
    defining = RUN_KEYS + (SHARD_KEYS if is_shards(saved["data"]) else ())
    for key in defining:
        if key in typed and getattr(args, key) != saved.get(key, BEFORE_KEY.get(key)):
            print(f"warning: --resume ignores --{key.replace('_', '-')} {getattr(args, key)}: "
                  f"the run uses {saved.get(key, BEFORE_KEY.get(key))}")
    kept = {k: saved.get(k, BEFORE_KEY.get(k)) for k in defining}
    kept |= {k: saved[k] for k in SCHEDULE_KEYS if k in saved and k not in typed}
    if saved.get("data_sha256") not in (None, data_digest(saved["data"])):
        raise ValueError(f"--resume: {saved['data']} has changed since the run started (its sha256 differs), so the "
                         "data order would change: restore it, or start a new run with --init OUT/last.pt")
    return argparse.Namespace(**{**vars(args), **kept})


def trim_metrics(path, step):
    """A fresh run starts a new log; a resumed one drops what the interrupted run logged after its last save (and a
    line torn by a kill in the middle of writing it)."""
    if path.exists():
        records = []
        for line in path.read_text().splitlines() if step else []:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step, save and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self.previous = False, signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self.handle)  # restored by __exit__, however the loop ends

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: saving after this step (Ctrl-C again to stop at once)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def lock_run_dir(out):
    """Creates the run folder and holds an exclusive lock on it (fcntl.flock on OUT/.lock, which records the PID) until
    this process exits, so two runs never write into one folder. Returns the open lock file: keep a reference."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}): choose another --out") from None
    try:
        import fcntl  # Unix; elsewhere the folder is not locked
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        return lock
    except OSError:
        lock.seek(0)
        raise ValueError(f"{out} is in use by another run (PID {lock.read().strip() or '?'}): wait for it to end, "
                         "or choose another --out") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock
