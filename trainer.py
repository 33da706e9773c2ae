"""
The train-then-select loop of the few-shot adapters (adapters.py) and of AA-CLIP's two stages (aa_clip.py), after
minGPT's Trainer.run (https://github.com/karpathy/minGPT, mingpt/trainer.py): epochs of optimisation steps, a
validation score after every epoch, and at the end the best-scoring state restored. Choosing the epoch on a
validation split, never on test, is the model selection the papers' protocols ask for (CoOp, Zhou et al. 2022,
section 4.1). The caller builds the optimiser and the learning-rate schedule; `get_lr` is the schedule every loop
of this project uses.
"""
import copy
import math
import time

import torch


def get_lr(step, peak, warmup, total):
    """Linear warmup to the peak, then cosine decay to 0 (open_clip cosine_lr; SGDR, Loshchilov & Hutter 2017)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * peak


def snapshot(modules):
    return copy.deepcopy([m.state_dict() for m in modules])


def train_and_select(modules, optimizer, scheduler, batches, loss_fn, validate, epochs, patience=0, resume=None,
                     on_epoch=None):
    """Trains `modules` and leaves them in their best state on val. Returns (best epoch, best score, history).

    batches(epoch) -> the batches of epoch 1..epochs; loss_fn(batch) -> scalar loss; validate() -> a score, higher
    is better (a tuple compares in order, e.g. (accuracy, -loss)). Epoch 0 is the initialisation, scored first, so a
    method that only gets worse keeps its starting point. A non-finite loss skips its batch (never stepped on).
    patience P > 0 stops after P epochs without improvement (early stopping). on_epoch(record, state) after every
    epoch; `state` passed back as `resume` continues an interrupted run from that epoch."""
    if resume:
        for m, s in zip(modules, resume["modules"]):
            m.load_state_dict(s)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        best, history, start = resume["best"], resume["history"], resume["epoch"] + 1
    else:
        best, history, start = {"epoch": 0, "score": validate(), "state": snapshot(modules)}, [], 1
    for epoch in range(start, epochs + 1):
        t0, losses, skipped = time.time(), [], 0
        for m in modules:
            m.train()
        for batch in batches(epoch):
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        for m in modules:
            m.eval()
        score = validate()
        if score > best["score"]:
            best = {"epoch": epoch, "score": score, "state": snapshot(modules)}
        history.append({"epoch": epoch, "loss": sum(losses) / len(losses) if losses else None, "val": score,
                        "skipped": skipped, "seconds": round(time.time() - t0, 1)})
        if on_epoch:
            on_epoch(history[-1], {"modules": [m.state_dict() for m in modules], "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                                   "history": history})
        if patience and epoch - best["epoch"] >= patience:
            break  # early stopping
    for m, s in zip(modules, best["state"]):
        m.load_state_dict(s)
    return best["epoch"], best["score"], history
