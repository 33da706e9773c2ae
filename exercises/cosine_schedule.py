"""
Exercise cosine_schedule: the learning rate over a run (linear warmup, then cosine decay), and the clamp that keeps
CLIP's learned temperature in range.

Read: SGDR (Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983), equation 5; warmup: Goyal et al. 2017,
https://arxiv.org/abs/1706.02677, section 2.2; CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020),
section 2.5 ("cosine schedule"; the temperature "clipped to prevent scaling the logits by more than 100");
open_clip src/open_clip_train/scheduler.py, cosine_lr (https://github.com/mlfoundations/open_clip).

    python exercises.py check cosine_schedule
    python exercises.py hint cosine_schedule

You will need: import math; import torch.
"""


def cosine_schedule(step, peak, warmup, total):
    """The learning rate at optimisation step `step` (0, 1, ..., total - 1) of a run of `total` steps.

    Steps 0 .. warmup-1: a linear rise that reaches `peak` at step warmup-1. From step `warmup` on: a half cosine
    from `peak` down to 0 at step `total`; after `total` it stays at 0. warmup may be 0.
    Returns a float.
    """
    # YOUR CODE HERE (about 4 lines)
    raise NotImplementedError("cosine_schedule: write warmup + cosine")


def clamp_logit_scale(logit_scale):
    """After each optimiser step: keep CLIP's logit_scale (an nn.Parameter holding log(1 / temperature)) between 0
    and log(100), so that the logits are scaled by at least 1 and at most 100. Change the parameter in place, as
    train.py does (the optimiser holds this very tensor); return nothing.
    """
    # YOUR CODE HERE (about 2 lines)
    raise NotImplementedError("clamp_logit_scale: clamp the logit scale")
