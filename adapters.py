"""
Few-shot adaptation of a pretrained CLIP to an image classification task: every method the articles describe,
each formula written once as a named function, every trained method run by one loop (trainer.train_and_select)
under one honest protocol.

Methods (--method), with the paper and the part of it each function follows:
  zeroshot       class names x templates -> class weights (CLIP, Radford et al. 2021, section 3.1.4)
  linear-probe   L-BFGS logistic regression on frozen image features, its L2 strength chosen on val (CLIP section
                 3.2 and appendix A.3; the baseline of the papers)
  clip-adapter   bottleneck MLP + residual blend on the features (CLIP-Adapter, Gao et al., arXiv 2110.04544, sec. 3.2)
  tip-adapter    training-free key-value cache of the few-shot features (Tip-Adapter, Zhang et al., arXiv 2207.09519,
                 sec. 3.2)
  tip-adapter-f  the same with learnable keys (Tip-Adapter sec. 3.3)
  cross-modal    a zero-shot-initialised linear head trained on image AND text features (Lin et al., arXiv 2301.06267)
  cross-modal-random  the same head from a random init, as the authors' linear_probe.sh now runs it
  uni-modal      a random-initialised head trained on images only, the paper's comparison
  fd-align       image encoder fine-tuned with CE + a KL on spurious-prototype distributions (Song et al.,
                 arXiv 2310.15105)
  finetune       full fine-tuning of the image encoder with a head and early stopping on val (the baseline)
  coop           learnable context vectors in the text encoder's input (CoOp, Zhou et al., arXiv 2109.01134, sec. 3.2)
Where the released code of a paper differs from its text, the function's docstring says so and names the file.

Protocol (CoOp's: Zhou et al. 2022 section 4.1, and CoOp's datasets/*.py for the validation shots): an
ImageFolder-style directory (DIR/train/<class>/*.png and DIR/val, DIR/test; or DIR/<class>/*.png, which is split
once with seed 0). K training images per class and min(K, 4) validation images per class are drawn with --seed
and written to JSON (reloaded when present). Every choice (Tip-Adapter alpha/beta, CLIP-Adapter ratio, the linear
probe's C, the epoch) is made on val; the test split is read once, at the end (the reference Tip-Adapter code,
main.py, selects on test; we do not). Frozen-encoder features are cached (fewshot.FeatureBank).

    python adapters.py --method tip-adapter --init out/shapes/last.pt --shots 16 --seed 1   # no --data: built-in task
    python train.py --method tip-adapter --init out/shapes/last.pt ...                      # the same, via train.py
    python adapters.py benchmark     # every method x K in {1,2,4,8,16} x seed in {1,2,3} -> out/adapters/
"""
import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from fewshot import (build_task, data_root, encode_items, load_bank, make_few_shot, read_test, task_templates,
                     template_features)
from plot import write_reports
from runtime import error_line, log_metrics, pick_device, plain_warnings, precision_line, PRECISIONS
from templates import get_templates
from tokenizer import count_tokens, tokenize
from trainer import get_lr, train_and_select
from transform import load_image

ROOT = Path(__file__).resolve().parent
# The logit scale where the reference code writes a fixed 100: Tip-Adapter's 100 f W^T (main.py), cross-modal's
# head (--logit 4.60517 = ln 100, engine/model/logit.py), AA-CLIP's 100 x cosine (forward_utils.py). 100 is where
# OpenAI's exp(logit_scale) ends up (clamped, CLIP section 2.5); this project's checkpoint learns ~18. CoOp and
# CLIP-Adapter (trainers/coop.py, clip_adapter.py) and FD-Align (get_zeroshot_weight, get_context_weights in
# architectures/feature_extractor/clip.py) use the model's own exp(logit_scale) instead: fewshot.Task.temperature.
CLIP_SCALE = 100.0
WARMUP_LR = 1e-5  # CoOp's warm-up (configs/trainers/CoOp/rn50.yaml: 1 epoch, constant, WARMUP_CONS_LR 1e-5)

# Per-method defaults of the training loop's flags (--epochs, --lr, --wd, --batch-size, --optimizer,
# --warmup-epochs, --patience; a flag given on the command line overrides them). Optimisers are the papers': "sgd"
# is Dassl's SGD in CoOp's configs (momentum 0.9, weight decay 5e-4), which CLIP-Adapter's README says to use;
# "nesterov" is FD-Align's (modules/utils.py set_schedule); AdamW is Tip-Adapter's and cross-modal's. Epochs are
# shorter than the papers' (CoOp 50-200, FD-Align 60, cross-modal 12,800 iterations) so the CPU benchmark runs in
# minutes; the papers' learning rates then barely move this model, so they were re-chosen on the built-in task's
# VAL split (1, 4 and 16 shots x seeds 1-3, the best mean val accuracy; the test split never read): SGD's from
# {1e-3, 3e-3, ..., 3e-1}, FD-Align's and fine-tuning's from {3e-5, 1e-4, ..., 3e-2}, the heads' from cross-modal's
# grid {1e-4, 1e-3} x epochs {40, 200, 800} (one schedule for the three heads, as cross-modal's code runs the same
# iterations for every head; a random head needs the long one). zeroshot, linear-probe, tip-adapter: no loop.
METHOD_DEFAULTS = {
    "clip-adapter": dict(epochs=40, lr=0.1, wd=5e-4, batch_size=32, optimizer="sgd", warmup_epochs=1),  # CoOp's: 2e-3
    "tip-adapter-f": dict(epochs=20, lr=1e-3, wd=1e-2, batch_size=256),  # Tip-Adapter: AdamW 1e-3, 20 epochs, batch 256
    "cross-modal": dict(epochs=800, lr=1e-3, wd=1e-4, batch_size=32),  # its code: AdamW {1e-3, 1e-4}, batch {8, 32}
    "cross-modal-random": dict(epochs=800, lr=1e-3, wd=1e-4, batch_size=32),
    "uni-modal": dict(epochs=800, lr=1e-3, wd=1e-4, batch_size=32),
    "coop": dict(epochs=40, lr=3e-3, wd=5e-4, batch_size=32, optimizer="sgd", warmup_epochs=1),  # CoOp: 2e-3, batch 32
    "fd-align": dict(epochs=20, lr=3e-3, wd=5e-4, batch_size=32, optimizer="nesterov", patience=5),  # FD-Align: ~5e-5
    "finetune": dict(epochs=20, lr=3e-3, wd=5e-4, batch_size=32, optimizer="nesterov", patience=5),  # its FT_CoOp
}
NO_TRAINING = dict(epochs=0, lr=0.0, wd=0.0, batch_size=0, optimizer="adamw", warmup_epochs=0, patience=0)

# ----------------------------------------------------------------------------------------------------------------
# The formulas, each written once


def clip_logits(image_features, class_weights, scale):
    """CLIP's classifier: cosine similarity between images (B, D) and class weights (C, D), times the logit scale
    (the model's exp(logit_scale), or CLIP_SCALE where a paper's code fixes 100) -> (B, C)."""
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(class_weights, dim=-1).T


def class_prototypes(template_features):
    """Zero-shot class weights from (C, M, D) per-template text embeddings: normalise each template embedding,
    average over the M templates, renormalise (CLIP's prompt ensembling; Tip-Adapter and CoOp do the same).
    This is also FD-Align's class prototype mu_y. (Cross-modal's code averages before normalising: a small
    difference.)"""
    return F.normalize(F.normalize(template_features, dim=-1).mean(dim=1), dim=-1)  # (C, D)


def spurious_prototypes(template_features):
    """FD-Align's spurious (context) prototypes: for each template P_j, the average over CLASSES of the normalised
    embeddings of P_j filled with each class, renormalised -> (M, D). (The reference code,
    get_ILF_kmeans_weights_classifier in FD-Align's architectures/feature_extractor/clip.py, further prunes them with
    an IsolationForest and KMeans to 20 centroids; we keep all M, as the paper's formula does.)"""
    return F.normalize(F.normalize(template_features, dim=-1).mean(dim=0), dim=-1)  # (M, D)


def residual_blend(x, adapted, ratio):
    """CLIP-Adapter's residual mix: x' = ratio * A(x) + (1 - ratio) * x (ratio = alpha in the paper)."""
    return ratio * adapted + (1 - ratio) * x


def wise_ft(weight, zeroshot_weight, ratio):
    """WiSE-FT (Wortsman et al. 2022) as cross-modal's eval.py applies it: (1 - ratio) * tuned + ratio * zero-shot,
    the same blend as residual_blend."""
    return residual_blend(weight, zeroshot_weight, ratio)


def tip_cache(view_features, labels, num_classes):
    """Tip-Adapter's cache: keys = the few-shot features averaged over augmented views BEFORE normalising
    (view_features (A, N, D), raw), then L2-normalised -> (N, D); values = one-hot labels -> (N, C)."""
    keys = F.normalize(view_features.mean(dim=0), dim=-1)
    values = F.one_hot(labels, num_classes).float()
    return keys, values


def tip_cache_logits(affinity, cache_values, beta):
    """Tip-Adapter's cache term exp(-beta (1 - A)) L: affinity A (B, N) = f K^T, the cosine to each cached image,
    turned into a sharp positive weight, times the one-hot values L (N, C) -> (B, C)."""
    return torch.exp(-beta * (1 - affinity)) @ cache_values


def tip_adapter_logits(image_features, cache_keys, cache_values, text_weights, alpha, beta):
    """Tip-Adapter (eq. 6 of the paper): logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) L.
    image_features (B, D) and text_weights (C, D) normalised, cache_keys (N, D), cache_values (N, C) -> (B, C)."""
    cache_logits = tip_cache_logits(image_features @ cache_keys.T, cache_values, beta)  # (B, C)
    return CLIP_SCALE * image_features @ text_weights.T + alpha * cache_logits


def spurious_kl(tuned_features, frozen_features, prototypes, scale):
    """FD-Align's regulariser KL(P_0 || P_t), averaged over the batch ("batchmean").
    P = softmax(scale * cos(f(x), spurious prototypes)) for the frozen (P_0) and fine-tuned (P_t) encoder; scale is
    the model's exp(logit_scale), which get_context_weights multiplies into the prototypes.
    Direction: the reference code (modules/FD_Align_SCP_CoOp.py) calls nn.KLDivLoss()(log P_t, P_0) = KL(P_0 || P_t),
    the frozen model as the target (the paper's notation writes the arguments the other way round; the two agree to
    second order). Reduction: the code's default 'mean' divides by batch x n_prototypes, so its beta = 20 with 20
    prototypes equals weight 1 here."""
    log_p_tuned = F.log_softmax(clip_logits(tuned_features, prototypes, scale), dim=-1)  # (B, M)
    log_p_frozen = F.log_softmax(clip_logits(frozen_features, prototypes, scale), dim=-1)
    return (log_p_frozen.exp() * (log_p_frozen - log_p_tuned)).sum(dim=-1).mean()


def logistic_regression(x, y, num_classes, c, max_iter=1000):
    """Multinomial logistic regression, the CLIP paper's linear probe (appendix A.3: scikit-learn's L-BFGS, at most
    1,000 iterations). The objective is scikit-learn's LogisticRegression(C=c) (>= 1.1), the mean cross-entropy plus
    ||W||^2 / (2 C N), bias unpenalised; its minimiser is that of C * sum CE + ||W||^2 / 2. Full batch, float64, from
    zeros as scikit-learn starts. x (N, D), y (N,) -> W (K, D), b (K,)."""
    x, n = x.double(), len(x)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + (w ** 2).sum() / (2 * c * n)
        loss.backward()
        return loss
    opt.step(objective)
    return w.detach(), b.detach()


def search_c(score, exponents=(-6, -4, -2, 0, 2, 4, 6), per_decade=8):
    """CLIP's search for the L2 strength (appendix A.3): score C = 10^e on a coarse grid (1e-6 ... 1e6), then
    "iteratively halve the interval around the peak" to `per_decade` steps per decade: step 1, 1/2, 1/4, 1/8
    decades, each time moving to the best of (e - step, e, e + step). score(C) -> a val score, higher is better
    (selection_score). Returns (C, its score); each C is scored once."""
    scores = {}

    def at(e):
        if e not in scores:
            scores[e] = score(10.0 ** e)
        return scores[e]
    e, step = max(exponents, key=at), 1.0
    while step >= 1 / per_decade:
        e = max((e - step, e, e + step), key=at)
        step /= 2
    return 10.0 ** e, scores[e]


def accuracy(logits, labels):
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def selection_score(logits, labels):
    """What every val choice maximises: accuracy first, then lower cross-entropy (few-shot val sets are tiny, so
    many candidates tie on accuracy; the loss breaks the tie instead of the order of a grid)."""
    return accuracy(logits, labels), -F.cross_entropy(logits, labels).item()

# ----------------------------------------------------------------------------------------------------------------
# Trainable pieces


class CLIPAdapter(nn.Module):
    """Bottleneck adapter (CLIP-Adapter section 3.2): A(x) = ReLU(W2 ReLU(W1 x)), no biases, dim -> dim/reduction
    -> dim (note the ReLU after the second layer too, as in the released code), blended with the input by `ratio`."""

    def __init__(self, dim, reduction=4, ratio=0.2):
        super().__init__()
        self.ratio = ratio
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x):
        return residual_blend(x, self.fc(x), self.ratio)


class ClassifierHead(nn.Module):
    """logits = scale * normalise(x) W^T (+ b), W initialised from zero-shot class weights or at random (head_init).
    Cross-modal's head: scale 100, no bias. FD-Align's CoOp_head: scale 1, W = exp(logit_scale) x the zero-shot
    weights, b = 0 (the scale is baked into W, as get_zeroshot_weight does). W is not renormalised during training."""

    def __init__(self, weight, bias=False, scale=CLIP_SCALE):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (C, D)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0])) if bias else None
        self.scale = scale

    def forward(self, x):
        logits = self.scale * F.normalize(x, dim=-1) @ self.weight.T
        return logits if self.bias is None else logits + self.bias


class TipKeys(nn.Module):
    """Tip-Adapter-F: the cache keys as a learnable (N, D) matrix, initialised with the cache (not renormalised)."""

    def __init__(self, keys):
        super().__init__()
        self.keys = nn.Parameter(keys.clone())


class CoOpPrompts(nn.Module):
    """CoOp: class c's prompt is [SOS] v_1 ... v_M [CLASS c] . [EOS], with M shared context vectors v_m learned
    in the token-embedding space (class token at the end, CSC off: the paper's default). The text encoder is frozen;
    gradients flow through it to the context only."""

    def __init__(self, model, classnames, n_ctx, init_std=0.02):
        super().__init__()
        self.model = [model]  # a list hides the frozen CLIP from .parameters() and .state_dict()
        placeholder = " ".join(["X"] * n_ctx)  # one BPE token each; their embeddings are replaced below
        self.register_buffer("tokens", tokenize([f"{placeholder} {c}." for c in classnames],
                                                model.config.text.context_length))  # (C, L)
        self.ctx = nn.Parameter(init_std * torch.randn(n_ctx, model.config.text.width))  # (M, width), N(0, 0.02^2)

    def forward(self):
        model = self.model[0]
        with torch.no_grad():
            embedded = model.token_embedding(self.tokens)  # (C, L, width)
        ctx = self.ctx.unsqueeze(0).expand(embedded.shape[0], -1, -1)  # (C, M, width)
        x = torch.cat([embedded[:, :1], ctx, embedded[:, 1 + ctx.shape[1]:]], dim=1)  # SOS, context, class . EOS
        return model.encode_text_embeddings(x, self.tokens)  # (C, D) class weights, pooled at EOT

# ----------------------------------------------------------------------------------------------------------------
# The training loop: its settings, the optimiser, the loop on cached features


@dataclass
class Fit:
    """The training loop's settings (fit_settings fills them from the flags and METHOD_DEFAULTS)."""
    epochs: int
    lr: float
    wd: float
    batch_size: int
    optimizer: str = "adamw"  # "sgd" (momentum 0.9) or "nesterov" (SGD, Nesterov momentum 0.9): make_optimizer
    warmup_epochs: int = 0  # epochs at the constant WARMUP_LR before the cosine (CoOp's warm-up)
    patience: int = 0  # stop after this many epochs without improvement on val (0: run every epoch)
    seed: int = 0  # the batch order, the augmented views drawn, random initialisations
    log_dir: str = None  # per-epoch records go to LOG_DIR/metrics.jsonl


def make_optimizer(params, fit, steps_per_epoch):
    """The optimiser of fit.optimizer: "adamw" (eps 1e-4 as Tip-Adapter's main.py, fp16-safe; cross-modal's AdamW),
    "sgd" (momentum 0.9: Dassl's SGD, CoOp and CLIP-Adapter) or "nesterov" (SGD with Nesterov momentum 0.9, FD-Align's
    set_schedule); and its schedule, stepped once per optimisation step: fit.warmup_epochs epochs at the constant
    WARMUP_LR (Dassl's ConstantWarmupScheduler, CoOp's configs), then trainer.get_lr's cosine from fit.lr to 0."""
    if fit.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.wd, eps=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=fit.lr, momentum=0.9, nesterov=fit.optimizer == "nesterov",
                                    weight_decay=fit.wd)
    warmup, total = fit.warmup_epochs * steps_per_epoch, fit.epochs * steps_per_epoch
    warm = WARMUP_LR / fit.lr if fit.lr else 0.0  # LambdaLR multiplies the optimiser's lr, fit.lr
    schedule = lambda step: warm if step < warmup else get_lr(step - warmup, 1.0, 0, total - warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train(modules, loss_fn, n, fit, validate, name):
    """The loop of every trained method: trainer.train_and_select on n training samples in random batches (a generator
    seeded with fit.seed draws one permutation per epoch), the optimiser and schedule of make_optimizer, the best val
    epoch restored. loss_fn(indices) -> the loss of those samples; validate() -> selection_score on val. Returns the
    best epoch (0: the initialisation), its val accuracy and the number of epochs run."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    batch, order = min(fit.batch_size, n), torch.Generator().manual_seed(fit.seed)
    optimizer, scheduler = make_optimizer(params, fit, math.ceil(n / batch))

    def log(record, state):
        if fit.log_dir:
            log_metrics(fit.log_dir, {"method": name, "epoch": record["epoch"], "loss": record["loss"],
                                      "val_acc": record["val"][0], "val_loss": -record["val"][1]})
    best_epoch, best_score, history = train_and_select(
        modules, optimizer, scheduler, lambda epoch: torch.randperm(n, generator=order).split(batch), loss_fn, validate,
        fit.epochs, fit.patience, on_epoch=log)
    return {"best_epoch": best_epoch, "best_epoch_val_acc": best_score[0], "epochs_run": len(history)}


def feature_loss(task, head, seed, with_text=False):
    """loss_fn of a head on cached features: each training sample shows one of its augmented views, drawn at random
    (seeded) every time it is used. with_text: cross-modal adaptation's batch, which adds as many (class, template)
    text features with their class labels, half and half (CROSS_MODAL_BATCH_RATIO = 0.5 in its train.py)."""
    views, labels = task.view_stack(), task.labels(task.train)  # (A, N, D), (N,)
    text = F.normalize(task.text, dim=-1).flatten(0, 1)  # (C*M, D)
    text_labels = torch.arange(len(task.classes)).repeat_interleave(task.text.shape[1])
    view_gen, text_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)

    def loss_fn(idx):
        v = torch.randint(0, views.shape[0], (len(idx),), generator=view_gen)
        if not with_text:
            return F.cross_entropy(head(views[v, idx]), labels[idx])
        t = torch.randint(0, len(text), (len(idx),), generator=text_gen)
        logits, targets = torch.cat([head(views[v, idx]), head(text[t])]), torch.cat([labels[idx], text_labels[t]])
        return F.cross_entropy(logits, targets)
    return loss_fn


def val_scorer(task, head):
    feats, labels = task.features(task.val), task.labels(task.val)
    return lambda: selection_score(head(feats).detach(), labels)


def train_on_features(task, modules, head, fit, name, with_text=False):
    """train() for a head on cached features: feature_loss on the training views, selected on the val features."""
    loss_fn = feature_loss(task, head, fit.seed, with_text)
    return train(modules, loss_fn, len(task.train), fit, val_scorer(task, head), name)

# ----------------------------------------------------------------------------------------------------------------
# The methods. Each returns (logits function on items, info for results.json, modules to save).


def zeroshot(task):
    weights = class_prototypes(task.text)
    return task.on_features(lambda f: clip_logits(f, weights, task.temperature)), {}, {}


def head_init(task, init, seed):
    """A head's initial (C, D) weights: the zero-shot class prototypes ("zeroshot") or "random": nn.Linear's
    default init, U(-1/sqrt(D), 1/sqrt(D)), which cross-modal's make_classifier_head (engine/model/head.py) keeps."""
    if init == "zeroshot":
        return class_prototypes(task.text)
    n, dim = len(task.classes), task.text.shape[-1]
    return (2 * torch.rand(n, dim, generator=torch.Generator().manual_seed(seed)) - 1) / math.sqrt(dim)


def linear_probe(task):
    """CLIP's linear probe (section 3.2, appendix A.3): logistic_regression on the frozen, L2-normalised centre-crop
    features, C chosen by search_c on val. (CLIP's and CoOp's lpclip scripts fit raw features; normalised ones give
    every model the same scale, so one grid of C fits all.)"""
    x, y, n_cls = task.features(task.train), task.labels(task.train), len(task.classes)
    val_x, val_y = task.features(task.val), task.labels(task.val)

    def val_score(c):
        w, b = logistic_regression(x, y, n_cls, c)
        return selection_score((val_x.double() @ w.T + b).float(), val_y)
    c, (val_acc, _) = search_c(val_score)
    print(f"linear-probe: C {c:.3g} chosen on val (val acc {val_acc:.4f})")
    head = nn.Linear(x.shape[1], n_cls)
    head.weight.data, head.bias.data = (t.float() for t in logistic_regression(x, y, n_cls, c))
    return task.on_features(lambda f: head(f).detach()), {"C": c}, {"head": head}


def clip_adapter(task, ratios, reduction, side, fit):
    """Train one adapter per residual ratio and keep the best on val (the paper tunes the ratio per dataset).
    side: which features are adapted, "image", "text" or "both"."""
    weights, dim, best = class_prototypes(task.text), task.model.config.embed_dim, None
    for ratio in ratios:
        torch.manual_seed(fit.seed)
        image_ad = CLIPAdapter(dim, reduction, ratio) if side in ("image", "both") else nn.Identity()
        text_ad = CLIPAdapter(dim, reduction, ratio) if side in ("text", "both") else nn.Identity()
        head = lambda f, a=image_ad, t=text_ad: clip_logits(a(f), t(weights), task.temperature)
        info = train_on_features(task, [image_ad, text_ad], head, fit, f"clip-adapter r={ratio}")
        score = val_scorer(task, head)()
        print(f"clip-adapter ratio {ratio}: val acc {score[0]:.4f} (epoch {info['best_epoch']})")
        if best is None or score > best[0]:
            best = (score, head, dict(info, ratio=ratio), {"image_adapter": image_ad, "text_adapter": text_ad})
    return task.on_features(best[1]), best[2], best[3]


def search_alpha_beta(task, keys, values, weights, scale, steps):
    """Tip-Adapter's grid (utils.py search_hp) on the VAL features only: beta in 0.1..beta_max (steps[0] values),
    alpha in 0.1..alpha_max (steps[1] values), scale = (beta_max, alpha_max). The affinities are computed once, the
    cache term once per beta, and all alphas are scored at once."""
    val_f, val_y = task.features(task.val), task.labels(task.val)
    zero = tip_adapter_logits(val_f, keys, values, weights, 0.0, 1.0)  # alpha 0: zero-shot CLIP
    affinity = val_f @ keys.T  # (B, N)
    (beta_max, alpha_max), (nb, na) = scale, steps
    alphas = torch.tensor([0.1 + j * (alpha_max - 0.1) / na for j in range(na)])
    best = None
    for beta in [0.1 + i * (beta_max - 0.1) / nb for i in range(nb)]:
        logits = zero + alphas[:, None, None] * tip_cache_logits(affinity, values, beta)  # (na, B, C)
        accs = (logits.argmax(-1) == val_y).float().mean(-1)  # (na,)
        losses = F.cross_entropy(logits.transpose(1, 2), val_y.expand(na, -1), reduction="none").mean(-1)
        for j in range(na):  # the same order as selection_score: accuracy, then lower loss
            if best is None or (accs[j].item(), -losses[j].item()) > best[0]:
                best = ((accs[j].item(), -losses[j].item()), alphas[j].item(), beta)
    return best[1], best[2]


def tip_adapter(task, scale, steps, fit=None, init_alpha=1.0, init_beta=1.0):
    """Tip-Adapter: a cache of the training views, alpha and beta searched on val. With `fit`, Tip-Adapter-F: first
    the keys are trained with the initial alpha/beta (Tip-Adapter's init_alpha, init_beta) and the best val epoch
    kept, then alpha/beta are searched again, as the paper does (but on val, not on test)."""
    weights = class_prototypes(task.text)
    keys, values = tip_cache(task.raw_views(), task.labels(task.train), len(task.classes))  # build_cache_model
    info, modules = {}, {}
    if fit:
        tip = TipKeys(keys)
        train_head = lambda f: tip_adapter_logits(F.normalize(f, dim=-1), tip.keys, values, weights, init_alpha,
                                                  init_beta)
        info = train_on_features(task, [tip], train_head, fit, "tip-adapter-f")
        keys, modules = tip.keys.detach(), {"keys": tip}
    alpha, beta = search_alpha_beta(task, keys, values, weights, scale, steps)
    print(f"tip-adapter{'-f' if fit else ''}: alpha {alpha:.3f}, beta {beta:.3f} chosen on val")
    head = lambda f: tip_adapter_logits(f, keys, values, weights, alpha, beta)
    return task.on_features(head), dict(info, alpha=alpha, beta=beta), modules


def cross_modal(task, use_text, init, wise_ft_ratio, fit):
    """A head (scale 100, no bias), init "zeroshot" or "random" (head_init), trained on images and text (or images
    only); wise_ft_ratio > 0 then blends the trained weights towards the zero-shot ones (WiSE-FT, as cross-modal's
    eval.py). The uni-modal baseline starts at random: a text-initialised head already carries the text, as the
    authors say (linzhiqiu/cross_modal_adaptation: its tracker, and linear_probe.sh since Feb 2025)."""
    zs = class_prototypes(task.text)
    head = ClassifierHead(head_init(task, init, fit.seed))
    info = train_on_features(task, [head], head, fit, "cross-modal" if use_text else "uni-modal", with_text=use_text)
    if wise_ft_ratio:
        with torch.no_grad():
            head.weight.copy_(wise_ft(head.weight, zs, wise_ft_ratio))
        info["wise_ft"] = wise_ft_ratio
    return task.on_features(head), info, {"head": head}


def coop(task, n_ctx, fit):
    """n_ctx context vectors, fewer when the text encoder's context is too short for them and the longest class."""
    model = task.model
    longest = max(count_tokens(f"{c}.") for c in task.classes)
    room = model.config.text.context_length - longest - 2  # room for SOS, class, ".", EOS
    if room < n_ctx:
        print(f"coop: {room} context vectors (not {n_ctx}): the context length is {model.config.text.context_length}")
    n_ctx = min(n_ctx, room)
    torch.manual_seed(fit.seed)
    prompts = CoOpPrompts(model, task.classes, n_ctx).to(task.device)
    head = lambda f: clip_logits(f.to(task.device), prompts(), task.temperature).cpu()  # CoOp: logit_scale.exp()
    info = train_on_features(task, [prompts], head, fit, "coop")
    with torch.no_grad():
        weights = prompts().cpu()
    logits_fn = task.on_features(lambda f: clip_logits(f, weights, task.temperature))
    return logits_fn, dict(info, n_ctx=n_ctx), {"prompts": prompts}

# Methods that train the image encoder itself see images, not cached features.


def finetune(task, init, fit, fd_beta=0.0, spurious_templates="openai80"):
    """Full fine-tuning of the image encoder + FD-Align's CoOp_head (W = exp(logit_scale) x head_init's weights,
    "zeroshot" or "random", b = 0), with early stopping on val (FD-Align's FT_CoOp). fd_beta > 0 adds FD-Align's
    beta * KL(P_0 || P_t) on the spurious prototypes of `spurious_templates` (= FD-Align)."""
    encoder = copy.deepcopy(task.model.visual).float().to(task.device).requires_grad_(True)
    head = ClassifierHead(task.temperature * head_init(task, init, fit.seed), bias=True, scale=1.0).to(task.device)
    images, labels = [load_image(p) for p, _ in task.train], task.labels(task.train)  # decoded once
    prototypes = spurious_prototypes(template_features(task.model, task.classes, get_templates(spurious_templates),
                                                       task.device)).to(task.device) if fd_beta else None

    def loss_fn(idx):
        x = torch.stack([task.bank.aug_tf(images[i]) for i in idx.tolist()]).to(task.device)  # augment_transform
        y = labels[idx].to(task.device)
        with task.ctx:
            features = encoder(x).float()
            loss = F.cross_entropy(head(features), y)
            if fd_beta:
                with torch.no_grad():
                    frozen = task.model.encode_image(x).float()
                loss = loss + fd_beta * spurious_kl(features, frozen, prototypes, task.temperature)
        return loss

    logits_fn = lambda items: head(encode_items(encoder, items, task).to(task.device)).detach().cpu()
    val_labels = task.labels(task.val)
    validate = lambda: selection_score(logits_fn(task.val), val_labels)
    info = train([encoder, head], loss_fn, len(task.train), fit, validate, "fd-align" if fd_beta else "finetune")
    return logits_fn, dict(info, fd_beta=fd_beta) if fd_beta else info, {"visual": encoder, "head": head}


# The parsed flags -> each method's arguments (a: the flags of one run, fit: the loop's settings).
METHOD_FNS = {
    "zeroshot": lambda task, a, fit: zeroshot(task),
    "linear-probe": lambda task, a, fit: linear_probe(task),
    "clip-adapter": lambda task, a, fit: clip_adapter(task, a.ratios, a.reduction, a.adapter_side, fit),
    "tip-adapter": lambda task, a, fit: tip_adapter(task, a.search_scale, a.search_step),
    "tip-adapter-f": lambda task, a, fit: tip_adapter(task, a.search_scale, a.search_step, fit, a.init_alpha,
                                                      a.init_beta),
    "cross-modal": lambda task, a, fit: cross_modal(task, True, a.head_init or "zeroshot", a.wise_ft, fit),
    "cross-modal-random": lambda task, a, fit: cross_modal(task, True, "random", a.wise_ft, fit),
    "uni-modal": lambda task, a, fit: cross_modal(task, False, a.head_init or "random", a.wise_ft, fit),
    "fd-align": lambda task, a, fit: finetune(task, a.head_init or "zeroshot", fit, a.fd_beta, a.spurious_templates),
    "finetune": lambda task, a, fit: finetune(task, a.head_init or "zeroshot", fit),
    "coop": lambda task, a, fit: coop(task, a.n_ctx, fit),
}
METHODS = list(METHOD_FNS)

# ----------------------------------------------------------------------------------------------------------------
# One run: the frozen model and its feature bank, the task, the method, the test split read once


def fit_settings(args):
    """The loop's settings of one run: a loop flag left at None takes the method's default (METHOD_DEFAULTS)."""
    d = {**NO_TRAINING, **METHOD_DEFAULTS.get(args.method, {})}
    pick = {k: d[k] if getattr(args, k) is None else getattr(args, k) for k in NO_TRAINING}
    return Fit(**pick, seed=args.seed, log_dir=args.out)


def run(args, bank):
    """One method, one K, one seed: adapt the frozen model of `bank` (load_bank) to args.data, choose on val, read
    the test split once. args: the flags of one run (parse_args). Writes OUT/results.json, OUT/metrics.jsonl and,
    unless --no-save, OUT/adapter.pt; returns the results dict."""
    t0 = time.time()
    torch.manual_seed(args.seed)  # finetune's augmentations draw from the global generator
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = make_few_shot(args.data, args.shots, args.seed,
                          args.split_file or out / f"split_{args.shots}shot_seed{args.seed}.json")
    templates = task_templates(args.data, args.templates)
    task = build_task(bank, split, templates, args.aug_views)
    print(f"{args.method}: {len(task.classes)} classes, {len(task.train)} train / {len(task.val)} val images "
          f"({args.shots}-shot, seed {args.seed}), {len(templates)} template(s), data {args.data}")
    train_labels = task.labels(task.train)
    zs_train = accuracy(zeroshot(task)[0](task.train), train_labels)
    logits_fn, info, modules = METHOD_FNS[args.method](task, args, fit_settings(args))
    with torch.no_grad():
        results = {"method": args.method, "shots": args.shots, "seed": args.seed, "init": args.init, "data": args.data,
                   "train_acc_zeroshot": zs_train, "train_acc": accuracy(logits_fn(task.train), train_labels),
                   **info, "val_acc": accuracy(logits_fn(task.val), task.labels(task.val))}  # the final model's
        test = read_test(args.data, split["classes"])  # the first and only time the test split is read
        results.update(test_acc=accuracy(logits_fn(test), task.labels(test)), test_images=len(test),
                       seconds=round(time.time() - t0, 2))
    print(f"{args.method} {args.shots}-shot seed {args.seed}: val {results['val_acc']:.4f}, "
          f"test {results['test_acc']:.4f} ({results['test_images']} test images, read once at the end), "
          f"{results['seconds']} s")
    log_metrics(out, {"final": results})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if modules and not args.no_save:
        torch.save({"method": args.method, "classes": task.classes, "templates": templates, "results": results,
                    "modules": {k: m.state_dict() for k, m in modules.items()}}, out / "adapter.pt")
    return results

# ----------------------------------------------------------------------------------------------------------------
# Command line: one run (python adapters.py --method M, or python train.py --method M) and the benchmark


def add_method_args(parser):
    """The flags a single run and the benchmark share: the training loop, the methods' hyperparameters, features."""
    g = parser.add_argument_group("training loop (default: the method's own, listed at the end)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (the defaults are shorter than the "
                   "papers', for a CPU; the learning rates were chosen on val for them)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine schedule after the warm-up)")
    g.add_argument("--wd", type=float, default=None, help="weight decay")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size")
    g.add_argument("--patience", type=int, default=None, help="early stopping: epochs without val improvement "
                   "(0: run all epochs; the best val epoch is kept either way)")
    g.add_argument("--optimizer", choices=["adamw", "sgd", "nesterov"], default=None,
                   help="adamw; sgd (momentum 0.9, CoOp's); nesterov (SGD with Nesterov momentum 0.9, FD-Align's)")
    g.add_argument("--warmup-epochs", type=int, default=None, help=f"epochs at the constant lr {WARMUP_LR} first")
    g = parser.add_argument_group("methods")
    g.add_argument("--head-init", choices=["zeroshot", "random"], default=None,
                   help="initial head of cross-modal, uni-modal, finetune, fd-align: the zero-shot class weights or "
                   "random (default: random for uni-modal, zeroshot for the others; cross-modal-random: random)")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="CLIP-Adapter ratios (on val)")
    g.add_argument("--reduction", type=int, default=4, help="CLIP-Adapter bottleneck reduction")
    g.add_argument("--adapter-side", choices=["image", "text", "both"], default="image", help="CLIP-Adapter's features")
    # Tip-Adapter's configs range from [7, 3] (ImageNet) to [50, 50] (Flowers). A model whose own logit scale is below
    # 100 (MiniCLIP-S: 18) has a CLIP term 100 f W^T that outweighs a small alpha; on the built-in task's VAL split
    # [7, 30] beat [7, 3] at 2-16 shots, so it is the default here.
    g.add_argument("--search-scale", type=float, nargs=2, default=[7.0, 30.0], help="Tip-Adapter beta_max alpha_max")
    g.add_argument("--search-step", type=int, nargs=2, default=[200, 20], help="Tip-Adapter grid steps for beta, alpha")
    g.add_argument("--init-alpha", type=float, default=1.0, help="Tip-Adapter-F alpha while training")
    g.add_argument("--init-beta", type=float, default=1.0, help="Tip-Adapter-F beta while training")
    g.add_argument("--wise-ft", type=float, default=0.0, help="cross-modal: WiSE-FT ratio towards the zero-shot head")
    g.add_argument("--fd-beta", type=float, default=1.0, help="FD-Align KL weight (batchmean: the code's 20 / 20)")
    g.add_argument("--spurious-templates", default="openai80", help="FD-Align's templates for spurious prototypes")
    g.add_argument("--n-ctx", type=int, default=16, help="CoOp context vectors")
    g = parser.add_argument_group("features and device")
    g.add_argument("--templates", default="auto",
                   help="single, imagenet7, openai80, or a file (auto: DATA/templates.txt, else single)")
    g.add_argument("--aug-views", type=int, default=10, help="augmented views per image (Tip-Adapter's augment_epoch)")
    g.add_argument("--aug-min-scale", type=float, default=0.5, help="RandomResizedCrop lower scale (Tip-Adapter: 0.5)")
    g.add_argument("--feature-cache", default=str(ROOT / "out" / "adapters" / "features"), help="feature cache folder")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto: bf16 where the GPU or CPU multiplies bf16 natively, else fp32")
    return parser


def parse_args(argv, benchmark=False):
    """The flags of one run, or of the benchmark (lists of methods, shots and seed values). --data defaults to the
    built-in task; a missing flag or file raises ValueError or FileNotFoundError, which names it."""
    table = [f"  {m}: " + " ".join(f"{k}={v}" for k, v in d.items()) for m, d in METHOD_DEFAULTS.items()]
    epilog = "each method's defaults (optimizer adamw, warmup_epochs 0, patience 0 unless listed; others: no loop):\n"
    about = ("Every method x shots x seed on one ImageFolder task (CPU-friendly)." if benchmark else
             "Adapt a pretrained CLIP to a few-shot classification task with one method.")
    p = argparse.ArgumentParser(prog="adapters.py benchmark" if benchmark else "adapters.py", description=about,
                                epilog=epilog + "\n".join(table), formatter_class=argparse.RawDescriptionHelpFormatter)
    if benchmark:
        p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
        p.add_argument("--shots", "--shot", type=int, nargs="+", default=[1, 2, 4, 8, 16])
        p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
        p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for small models, shared CPU)")
    else:
        p.add_argument("--method", choices=METHODS, default=None, help="the adaptation method (required)")
        p.add_argument("--shots", "--shot", type=int, default=16, help="K training images per class (val: min(K, 4))")
        p.add_argument("--seed", type=int, default=0, help="draws the few-shot split, the batches, the initialisation")
        p.add_argument("--split-file", default=None, help="few-shot split JSON, reused when present "
                       "(default: OUT/split_{K}shot_seed{S}.json)")
        p.add_argument("--no-save", action="store_true", help="do not write OUT/adapter.pt")
    p.add_argument("--init", default=str(ROOT / "out" / "shapes" / "last.pt") if benchmark else None,
                   help="the pretrained checkpoint to adapt (anything load_checkpoint reads)")
    p.add_argument("--data", default=None, help="ImageFolder: DIR/{train,val,test}/<class>/* or DIR/<class>/* "
                   "(default: the built-in shifted-Shapes shape task)")
    p.add_argument("--out", default=str(ROOT / "out" / "adapters") if benchmark else None, help="output folder"
                   + ("" if benchmark else " (default: out/adapters/runs/{method}-{K}shot-seed{S})"))
    add_method_args(p)
    if benchmark:
        p.set_defaults(device="cpu")
    args = p.parse_args(argv)
    if not benchmark and args.method is None:
        raise ValueError(f"--method is required, one of: {' '.join(METHODS)}")
    if not benchmark and args.init is None:
        raise ValueError("--init CKPT is required: the pretrained CLIP to adapt (python train.py: out/shapes/last.pt)")
    if not Path(args.init).exists():
        raise FileNotFoundError(f"--init {args.init}: no such file (train the default model with python train.py)")
    args.data = data_root(args.data)
    if not benchmark and args.out is None:
        args.out = str(ROOT / "out" / "adapters" / "runs" / f"{args.method}-{args.shots}shot-seed{args.seed}")
    return args


def benchmark(args):
    """Every method x K x seed with the frozen model and its feature bank loaded once; writes OUT/results.json and
    plot.write_reports' table.md, results.csv and accuracy_vs_shots.png."""
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bank = load_bank(args.init, device, precision_line(device, args.precision), args.feature_cache, args.aug_min_scale)
    rows, t0 = [], time.time()
    for k in args.shots:
        for seed in args.seeds:
            for m in args.methods:
                one = dict(vars(args), method=m, shots=k, seed=seed, no_save=True,
                           out=str(Path(args.out) / "runs" / f"{m}-{k}shot-seed{seed}"),
                           split_file=str(Path(args.out) / "splits" / f"split_{k}shot_seed{seed}.json"))
                rows.append(run(argparse.Namespace(**one), bank))
                print(f"[benchmark] {len(rows)} runs, {time.time() - t0:.0f} s")
    title = (f"Few-shot test accuracy (%), {Path(args.init).name} on {Path(args.data).name}, "
             f"mean ± std over seeds {args.seeds}")
    print(write_reports(rows, args.methods, args.shots, args.out, title))
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"benchmark: {len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}/table.md, results.csv, "
          "accuracy_vs_shots.png")
    return rows


def main(argv=None):
    """python adapters.py --method M --init CKPT [...] (one run; python train.py --method M [...] calls
    main(["--method", M, ...])) or python adapters.py benchmark [...]. A bad flag or file: one error line, exit 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    plain_warnings()
    try:
        if argv[:1] == ["benchmark"]:
            return benchmark(parse_args(argv[1:], benchmark=True))
        args = parse_args(argv)
        device = pick_device(args.device)
        precision = precision_line(device, args.precision)
        return run(args, load_bank(args.init, device, precision, args.feature_cache, args.aug_min_scale))
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and ImageLoadError are ValueErrors
        message = error_line(e)
    sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
