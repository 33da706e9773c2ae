"""
Few-shot adaptation of a pretrained CLIP to an image classification task: every method the articles describe,
each formula written once as a named function, all trained by one loop (`fit`) under one honest protocol.

Methods (--method), with the paper and the part of it each function follows:
  zeroshot       class names x templates -> class weights (CLIP, Radford et al. 2021, section 3.1.4)
  linear-probe   a linear head on frozen image features, random init (CLIP section 3.2; the baseline of the papers)
  clip-adapter   bottleneck MLP + residual blend on the features (CLIP-Adapter, Gao et al., arXiv 2110.04544, section 3.2)
  tip-adapter    training-free key-value cache of the few-shot features (Tip-Adapter, Zhang et al., arXiv 2207.09519, section 3.2)
  tip-adapter-f  the same with learnable keys (Tip-Adapter section 3.3)
  cross-modal    a zero-shot-initialised linear head trained on image AND text features (Lin et al., arXiv 2301.06267)
  uni-modal      the same head trained on images only, the paper's comparison
  fd-align       image encoder fine-tuned with CE + a KL on spurious-prototype distributions (Song et al., arXiv 2310.15105)
  finetune       full fine-tuning of the image encoder with a head and early stopping (the fine-tuning guide's baseline)
  coop           learnable context vectors in the text encoder's input (CoOp, Zhou et al., arXiv 2109.01134, section 3.2)
Formulas, defaults and known bugs of the reference code: shared/specs/adapters.md.

Protocol (CoOp's, shared/specs/adapters.md section 1): an ImageFolder-style directory (DIR/train/<class>/*.png and
DIR/val, DIR/test; or DIR/<class>/*.png, which is split once with seed 0). K training images per class and
min(K, 4) validation images per class are drawn with --seed and written to JSON (reloaded when present). Every
choice (Tip-Adapter alpha/beta, CLIP-Adapter ratio, the epoch) is made on val; the test split is read once, at
the end (the reference Tip-Adapter code selects on test; we do not). Frozen-encoder features are cached.

    python train.py --method tip-adapter --init out/shapes/last.pt --shots 16 --seed 1   # no --data: the built-in task
    python adapters.py benchmark            # every method x shots {1,2,4,8,16} x seeds {1,2,3} -> out/adapters/
"""
import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import (Compose, InterpolationMode, Normalize, RandomHorizontalFlip, RandomResizedCrop,
                                    ToTensor)

from checkpoints import load_checkpoint
from model import CLIP
from templates import get_templates
from tokenizer import count_tokens, tokenize
from transform import IMAGE_EXTENSIONS, OPENAI_MEAN, OPENAI_STD, image_transform, load_image

ROOT = Path(__file__).resolve().parent
CLIP_SCALE = 100.0  # exp(logit_scale) of a trained CLIP: clamped at 100 (CLIP section 2.5); Tip-Adapter writes 100
METHODS = ["zeroshot", "linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f", "cross-modal", "uni-modal",
           "fd-align", "finetune", "coop"]

# Per-method defaults for the flags train.py shares (--epochs, --lr, --wd, --batch-size). The papers' own values
# (AdamW/SGD, hundreds of epochs on a GPU) are in the comments; ours are shortened so the CPU benchmark runs in minutes.
METHOD_DEFAULTS = {
    "linear-probe": dict(epochs=60, lr=1e-2, wd=1e-4, batch_size=32),
    "clip-adapter": dict(epochs=40, lr=2e-3, wd=1e-4, batch_size=32),  # paper: CoOp's SGD 2e-3, 200 epochs
    "tip-adapter-f": dict(epochs=20, lr=1e-3, wd=1e-2, batch_size=256),  # Tip-Adapter: AdamW 1e-3, 20 epochs, batch 256
    "cross-modal": dict(epochs=40, lr=1e-3, wd=1e-4, batch_size=32),  # XM: AdamW {1e-3, 1e-4}, batch {8, 32}
    "uni-modal": dict(epochs=40, lr=1e-3, wd=1e-4, batch_size=32),
    "coop": dict(epochs=40, lr=2e-3, wd=0.0, batch_size=32),  # CoOp: SGD 2e-3, batch 32, 50-200 epochs
    "fd-align": dict(epochs=20, lr=3e-5, wd=0.05, batch_size=32, patience=5),  # FD-Align: SGD ~5e-5, 60 epochs
    "finetune": dict(epochs=20, lr=3e-5, wd=0.05, batch_size=32, patience=5),  # early stopping (fine-tuning guide)
}
SHARED = ("epochs", "lr", "wd", "batch_size")


# ----------------------------------------------------------------------------------------------------------------
# The formulas, each written once


def clip_logits(image_features, class_weights, scale=CLIP_SCALE):
    """CLIP's classifier: scaled cosine similarity between images (B, D) and class weights (C, D) -> (B, C)."""
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(class_weights, dim=-1).T


def class_prototypes(template_features):
    """Zero-shot class weights from (C, M, D) per-template text embeddings: normalise each template embedding,
    average over the M templates, renormalise (CLIP's prompt ensembling; Tip-Adapter and CoOp do the same).
    This is also FD-Align's class prototype mu_y. (Cross-modal's code averages before normalising: a small difference.)"""
    return F.normalize(F.normalize(template_features, dim=-1).mean(dim=1), dim=-1)  # (C, D)


def spurious_prototypes(template_features):
    """FD-Align's spurious (context) prototypes: for each template P_j, the average over CLASSES of the normalised
    embeddings of P_j filled with each class, renormalised -> (M, D). (The reference code further prunes them with an
    IsolationForest and KMeans to 20 centroids, spec section 5; we keep all M, as the paper's formula does.)"""
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


def spurious_kl(tuned_features, frozen_features, prototypes, scale=CLIP_SCALE):
    """FD-Align's regulariser KL(P_0 || P_t), averaged over the batch ("batchmean").
    P = softmax(scale * cos(f(x), spurious prototypes)) for the frozen (P_0) and fine-tuned (P_t) encoder.
    Direction: the reference code calls nn.KLDivLoss()(log P_t, P_0) = KL(P_0 || P_t), the frozen model as the target
    (the paper's notation writes the arguments the other way round; the two agree to second order). Reduction: the
    code's default 'mean' divides by batch x n_prototypes, so its beta = 20 with 20 prototypes equals weight 1 here."""
    log_p_tuned = F.log_softmax(clip_logits(tuned_features, prototypes, scale), dim=-1)  # (B, M)
    log_p_frozen = F.log_softmax(clip_logits(frozen_features, prototypes, scale), dim=-1)
    return (log_p_frozen.exp() * (log_p_frozen - log_p_tuned)).sum(dim=-1).mean()


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
    """logits = scale * normalise(x) W^T (+ b). Initialised from zero-shot class weights (cross-modal, FD-Align's
    CoOp_head, our fine-tuning baseline) or random unit rows (linear probe). W is not renormalised during training."""

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
        return model.encode_text_embeddings(x, self.tokens.argmax(dim=-1))  # (C, D) class weights, pooled at EOT

# ----------------------------------------------------------------------------------------------------------------
# Few-shot data: ImageFolder directories, seeded K-shot sampling saved to JSON, the test split read once


def list_class_folders(folder):
    """{class name: sorted image paths} for a folder of class folders."""
    classes = sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(str(p) for p in (Path(folder) / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes}


def seeded_split(root, fractions=(0.5, 0.2, 0.3)):
    """A folder of class folders without train/val/test: split each class once (seed 0, whatever the few-shot seed),
    so every seed and method is tested on the same images."""
    parts = {"train": {}, "val": {}, "test": {}}
    for c, files in list_class_folders(root).items():
        files = files[:]
        random.Random(f"split-{c}").shuffle(files)
        a, b = round(fractions[0] * len(files)), round((fractions[0] + fractions[1]) * len(files))
        parts["train"][c], parts["val"][c], parts["test"][c] = files[:a], files[a:b], files[b:]
    return parts


def read_split(root, split):
    """The one place that lists a split's images: {class: [paths]}. Test is listed only by final_test()."""
    if split == "test":
        print(f"reading the test split of {root} (once, after all selection on val)")
    if (Path(root) / "train").is_dir():
        folder = Path(root) / split
        return list_class_folders(folder) if folder.is_dir() else None  # no val folder: val comes from train
    return seeded_split(root)[split]


def sample_few_shot(per_class, classes, k, seed, exclude=()):
    """k paths per class, seeded; the list is [[path, label]] in class order (lists, as JSON reloads them)."""
    rng, items = random.Random(seed), []
    for label, c in enumerate(classes):
        pool = [p for p in per_class.get(c, []) if p not in exclude]
        if len(pool) < k:
            raise ValueError(f"class {c!r} has {len(pool)} images, fewer than the {k} requested")
        items += [[p, label] for p in sorted(rng.sample(pool, k))]
    return items


def make_few_shot(root, shots, seed, path):
    """Draw (or reload from `path`) the K-shot train set and the min(K, 4)-shot val set (CoOp's protocol)."""
    if path and Path(path).exists():
        split = json.loads(Path(path).read_text())
        if (split["root"], split["shots"], split["seed"]) != (str(root), shots, seed):
            raise ValueError(f"{path} holds {split['shots']}-shot seed {split['seed']} of {split['root']}")
        print(f"few-shot split reloaded from {path}")
        return split
    train = read_split(root, "train")
    classes = sorted(train)
    val = read_split(root, "val")
    train_items = sample_few_shot(train, classes, shots, seed)
    chosen = {p for p, _ in train_items}
    val_items = sample_few_shot(val or train, classes, min(shots, 4), seed + 10_000, exclude=() if val else chosen)
    split = {"root": str(root), "shots": shots, "seed": seed, "classes": classes, "train": train_items, "val": val_items}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(split, indent=1))
    return split


def read_test(root, classes):
    items = [(p, classes.index(c)) for c, files in read_split(root, "test").items() if c in classes for p in files]
    if not items:
        raise ValueError(f"{root}: the test split has no images of the task's classes")
    return items

# ----------------------------------------------------------------------------------------------------------------
# Frozen-encoder features, cached in memory and on disk


def augment_transform(image_size, min_scale=0.5):
    """Tip-Adapter's few-shot augmentation: RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip."""
    return Compose([RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
                    RandomHorizontalFlip(), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])


def view_tensor(path, view, eval_tf, aug_tf, image=None):
    """View 0: the eval transform (resize + centre crop). View v > 0: the v-th augmented view of this file, seeded by
    (path, v), so the same view is reproducible and cacheable. The global RNG is left as it was."""
    image = image if image is not None else load_image(path)
    if view == 0:
        return eval_tf(image)
    state = torch.get_rng_state()
    torch.manual_seed(zlib.crc32(f"{Path(path).name}:{view}".encode()))
    x = aug_tf(image)
    torch.set_rng_state(state)
    return x


class FeatureBank:
    """Raw (unnormalised) image features of the frozen encoder, per (file, view); only missing ones are computed.
    The disk file is keyed by the checkpoint, so another checkpoint never reads these features."""

    def __init__(self, model, device, ctx, cache_file=None, min_scale=0.5):
        self.model, self.device, self.ctx, self.cache_file = model, device, ctx, cache_file
        size = model.config.vision.image_size
        self.eval_tf, self.aug_tf = image_transform(size), augment_transform(size, min_scale)
        self.store = torch.load(cache_file, weights_only=True) if cache_file and Path(cache_file).exists() else {}

    def get(self, paths, view=0):
        missing = [p for p in paths if f"{view}:{p}" not in self.store]
        for i in range(0, len(missing), 128):
            chunk = missing[i:i + 128]
            x = torch.stack([view_tensor(p, view, self.eval_tf, self.aug_tf) for p in chunk]).to(self.device)
            with torch.no_grad(), self.ctx:
                features = self.model.encode_image(x).float().cpu()  # (b, D)
            self.store.update({f"{view}:{p}": f for p, f in zip(chunk, features)})
        if missing and self.cache_file:
            Path(self.cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.store, self.cache_file)
        return torch.stack([self.store[f"{view}:{p}"] for p in paths])  # (N, D)


@torch.no_grad()
def template_features(model, classnames, templates, device):
    """Text embeddings of every (class, template) prompt -> (C, M, D), unnormalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenize(prompts, model.config.text.context_length).to(device)
    x = torch.cat([model.encode_text(tokens[i:i + 512]).float() for i in range(0, len(prompts), 512)])
    return x.view(len(classnames), len(templates), -1).cpu()

# ----------------------------------------------------------------------------------------------------------------
# The task a method sees, and the one training loop


@dataclass
class Task:
    model: CLIP  # frozen, eval mode
    device: torch.device
    ctx: object  # autocast context (train.autocast_context)
    bank: FeatureBank
    classes: list
    train: list  # [(path, label)]
    val: list
    text: torch.Tensor  # (C, M, D) template embeddings of the zero-shot templates
    args: argparse.Namespace

    def labels(self, items):
        return torch.tensor([y for _, y in items])

    def features(self, items, view=0):
        return F.normalize(self.bank.get([p for p, _ in items], view), dim=-1)

    def view_stack(self):
        """The training set's augmented views, normalised: (A, N, D)."""
        return torch.stack([self.features(self.train, v) for v in range(1, self.args.aug_views + 1)])

    def log(self, record):
        if self.args.out:
            _train().log_metrics(self.args.out, record)


def fit(modules, batch_loss, n, hp, val_score, task, name=""):
    """The training loop of every trained method. batch_loss(indices, epoch) -> (loss, logits, labels) on a
    minibatch of the n training samples; val_score() -> selection_score on val, called after every epoch. AdamW (or
    SGD with momentum) with train.py's warmup-free cosine schedule. The best val epoch's weights are restored; with
    --patience P, training stops after P epochs without improvement (early stopping)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if hp.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.wd)
    else:
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.wd, eps=1e-4)  # eps 1e-4 as Tip-Adapter (fp16-safe)
    batch = min(hp.batch_size, n)
    steps_per_epoch, gen = math.ceil(n / batch), torch.Generator().manual_seed(hp.seed)
    total, step, since_best = hp.epochs * steps_per_epoch, 0, 0
    best = (val_score(), -1, copy.deepcopy([m.state_dict() for m in modules]))  # epoch -1: the initialisation
    for epoch in range(hp.epochs):
        for m in modules:
            m.train()
        order, correct, losses = torch.randperm(n, generator=gen), 0, []
        for i in range(0, n, batch):
            for group in opt.param_groups:
                group["lr"] = _train().get_lr(step, hp.lr, 0, total)
            loss, logits, labels = batch_loss(order[i:i + batch], epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, correct = step + 1, correct + (logits.argmax(-1) == labels).sum().item()
            losses.append(loss.item())
        for m in modules:
            m.eval()
        score = val_score()
        task.log({"method": name, "epoch": epoch, "loss": sum(losses) / len(losses), "train_acc": correct / n,
                  "val_acc": score[0], "val_loss": -score[1]})
        if score > best[0]:
            best, since_best = (score, epoch, copy.deepcopy([m.state_dict() for m in modules])), 0
        else:
            since_best += 1
            if hp.patience and since_best >= hp.patience:
                break
    for m, state in zip(modules, best[2]):
        m.load_state_dict(state)
    return {"best_epoch": best[1], "val_acc": best[0][0], "epochs_run": epoch + 1 if hp.epochs else 0}


def feature_batches(task, head_fn):
    """batch_loss for methods on cached features: each sample shows one random augmented view per epoch."""
    views, labels = task.view_stack(), task.labels(task.train)  # (A, N, D), (N,)
    gen = torch.Generator().manual_seed(task.args.seed)

    def batch_loss(idx, epoch):
        v = torch.randint(0, views.shape[0], (len(idx),), generator=gen)
        logits = head_fn(views[v, idx])
        return F.cross_entropy(logits, labels[idx]), logits, labels[idx]
    return batch_loss


def val_scorer(task, logits_fn):
    feats, labels = task.features(task.val), task.labels(task.val)
    return lambda: selection_score(logits_fn(feats).detach(), labels)

# ----------------------------------------------------------------------------------------------------------------
# The methods. Each returns (logits_fn on normalised centre-crop features or on items, info, modules to save).


def zeroshot(task):
    weights = class_prototypes(task.text)
    return (lambda f: clip_logits(f, weights)), {}, {}


def random_unit_rows(n, dim, seed):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def linear_probe(task):
    head = ClassifierHead(random_unit_rows(len(task.classes), task.text.shape[-1], task.args.seed), bias=True)
    info = fit([head], feature_batches(task, head), len(task.train), task.args, val_scorer(task, head), task, "linear-probe")
    return head, info, {"head": head}


def clip_adapter(task):
    """Train one adapter per residual ratio in --ratios and keep the best on val (the paper tunes it per dataset)."""
    weights, dim, best = class_prototypes(task.text), task.model.config.embed_dim, None
    for ratio in task.args.ratios:
        torch.manual_seed(task.args.seed)
        image_ad = CLIPAdapter(dim, task.args.reduction, ratio) if task.args.adapter_side in ("image", "both") else nn.Identity()
        text_ad = CLIPAdapter(dim, task.args.reduction, ratio) if task.args.adapter_side in ("text", "both") else nn.Identity()
        logits_fn = lambda f, a=image_ad, t=text_ad: clip_logits(a(f), t(weights))
        info = fit([image_ad, text_ad], feature_batches(task, logits_fn), len(task.train), task.args,
                   val_scorer(task, logits_fn), task, f"clip-adapter r={ratio}")
        score = val_scorer(task, logits_fn)()
        print(f"clip-adapter ratio {ratio}: val acc {score[0]:.4f} (epoch {info['best_epoch']})")
        if best is None or score > best[0]:
            best = (score, logits_fn, dict(info, ratio=ratio), {"image_adapter": image_ad, "text_adapter": text_ad})
    return best[1], best[2], best[3]


def search_alpha_beta(cache_logits_at, clip_logits_val, val_labels, args):
    """Tip-Adapter's grid (utils.py search_hp): beta in 0.1..beta_max (200 steps), alpha in 0.1..alpha_max (20 steps),
    on the VAL features only. cache_logits_at(beta) -> the cache term at beta; all alphas are scored at once."""
    (beta_max, alpha_max), (nb, na) = args.search_scale, args.search_step
    alphas = torch.tensor([0.1 + j * (alpha_max - 0.1) / na for j in range(na)])
    best = None
    for beta in [0.1 + i * (beta_max - 0.1) / nb for i in range(nb)]:
        logits = clip_logits_val + alphas[:, None, None] * cache_logits_at(beta)  # (na, B, C): the Tip-Adapter sum
        accs = (logits.argmax(-1) == val_labels).float().mean(-1)  # (na,)
        losses = F.cross_entropy(logits.transpose(1, 2), val_labels.expand(na, -1), reduction="none").mean(-1)
        for j in range(na):  # the same order as selection_score: accuracy, then lower loss
            if best is None or (accs[j].item(), -losses[j].item()) > best[0]:
                best = ((accs[j].item(), -losses[j].item()), alphas[j].item(), beta)
    return best[1], best[2]


def tip_search(keys, values, weights, task):
    """alpha, beta for a cache on val (the affinities are computed once, the cache term once per beta)."""
    val_f, val_y = task.features(task.val), task.labels(task.val)
    zero = tip_adapter_logits(val_f, keys, values, weights, 0.0, 1.0)  # alpha 0: zero-shot CLIP
    affinity = val_f @ keys.T  # (B, N)
    return search_alpha_beta(lambda b: tip_cache_logits(affinity, values, b), zero, val_y, task.args)


def tip_adapter(task):
    weights = class_prototypes(task.text)
    keys, values = tip_cache(task.view_stack(), task.labels(task.train), len(task.classes))
    alpha, beta = tip_search(keys, values, weights, task)
    print(f"tip-adapter: alpha {alpha:.3f}, beta {beta:.3f} chosen on val")
    return (lambda f: tip_adapter_logits(f, keys, values, weights, alpha, beta)), {"alpha": alpha, "beta": beta}, {}


def tip_adapter_f(task):
    """Train the keys with the initial alpha/beta (Tip-Adapter's init_alpha, init_beta), keep the best val epoch,
    then search alpha/beta on val again, as the paper does (but on val, not on test)."""
    weights, args = class_prototypes(task.text), task.args
    keys, values = tip_cache(task.view_stack(), task.labels(task.train), len(task.classes))
    tip = TipKeys(keys)
    train_fn = lambda f: tip_adapter_logits(F.normalize(f, dim=-1), tip.keys, values, weights, args.init_alpha, args.init_beta)
    info = fit([tip], feature_batches(task, train_fn), len(task.train), args, val_scorer(task, train_fn), task, "tip-adapter-f")
    learned = tip.keys.detach()
    alpha, beta = tip_search(learned, values, weights, task)
    print(f"tip-adapter-f: alpha {alpha:.3f}, beta {beta:.3f} chosen on val")
    return (lambda f: tip_adapter_logits(f, learned, values, weights, alpha, beta)), dict(info, alpha=alpha, beta=beta), {"keys": tip}


def cross_modal_batches(task, head, use_text):
    """Cross-modal adaptation's minibatch: half image features, half (class, template) text features with their
    class labels (CROSS_MODAL_BATCH_RATIO = 0.5 in the reference train.py). use_text=False: the uni-modal variant."""
    image_loss = feature_batches(task, head)
    text = F.normalize(task.text, dim=-1).flatten(0, 1)  # (C*M, D)
    text_labels = torch.arange(len(task.classes)).repeat_interleave(task.text.shape[1])
    gen = torch.Generator().manual_seed(task.args.seed + 1)

    def batch_loss(idx, epoch):
        loss, logits, labels = image_loss(idx, epoch)
        if not use_text:
            return loss, logits, labels
        t = torch.randint(0, len(text), (len(idx),), generator=gen)
        text_logits = head(text[t])
        both = torch.cat([logits, text_logits]), torch.cat([labels, text_labels[t]])
        return F.cross_entropy(*both), logits, labels  # the reported train accuracy counts images only
    return batch_loss


def cross_modal(task, use_text=True):
    zs = class_prototypes(task.text)
    head = ClassifierHead(zs)
    name = "cross-modal" if use_text else "uni-modal"
    info = fit([head], cross_modal_batches(task, head, use_text), len(task.train), task.args, val_scorer(task, head), task, name)
    if task.args.wise_ft:
        with torch.no_grad():
            head.weight.copy_(wise_ft(head.weight, zs, task.args.wise_ft))
        info["wise_ft"] = task.args.wise_ft
    return head, info, {"head": head}


def coop(task):
    args, model = task.args, task.model
    longest = max(count_tokens(f"{c}.") for c in task.classes)
    n_ctx = min(args.n_ctx, model.config.text.context_length - longest - 2)  # room for SOS, class, ".", EOS
    if n_ctx < args.n_ctx:
        print(f"coop: {n_ctx} context vectors (not {args.n_ctx}): the context length is {model.config.text.context_length}")
    torch.manual_seed(args.seed)
    prompts = CoOpPrompts(model, task.classes, n_ctx).to(task.device)
    logits_fn = lambda f: clip_logits(f.to(task.device), prompts()).cpu()
    info = fit([prompts], feature_batches(task, logits_fn), len(task.train), args, val_scorer(task, logits_fn), task, "coop")
    with torch.no_grad():
        weights = prompts().cpu()
    return (lambda f: clip_logits(f, weights)), dict(info, n_ctx=n_ctx), {"prompts": prompts}

# Methods that train the image encoder itself see images, not cached features.


class ImageSet:
    """The few-shot images decoded once; batches are augmented on the fly (Tip-Adapter's augmentation)."""

    def __init__(self, items, image_size, min_scale):
        self.images = [load_image(p) for p, _ in items]
        self.labels = torch.tensor([y for _, y in items])
        self.aug_tf, self.eval_tf = augment_transform(image_size, min_scale), image_transform(image_size)

    def batch(self, idx, train):
        tf = self.aug_tf if train else self.eval_tf
        return torch.stack([tf(self.images[i]) for i in idx]), self.labels[idx]


@torch.no_grad()
def encode_items(encoder, items, task):
    """Centre-crop features of `items` through a (possibly fine-tuned) image encoder -> (N, D) on the CPU."""
    tf, out = image_transform(task.model.config.vision.image_size), []
    for i in range(0, len(items), 128):
        x = torch.stack([tf(load_image(p)) for p, _ in items[i:i + 128]]).to(task.device)
        with task.ctx:
            out.append(encoder(x).float().cpu())
    return torch.cat(out)


def finetune(task, fd_beta=0.0):
    """Full fine-tuning of the image encoder + a zero-shot-initialised head (FD-Align's CoOp_head: bias 0), with
    early stopping on val. fd_beta > 0 adds FD-Align's beta * KL(P_0 || P_t) on spurious prototypes (= FD-Align)."""
    args = task.args
    encoder = copy.deepcopy(task.model.visual).float().to(task.device).requires_grad_(True)
    init = (class_prototypes(task.text) if args.head_init == "zeroshot"
            else random_unit_rows(len(task.classes), task.text.shape[-1], args.seed))
    head = ClassifierHead(init, bias=True).to(task.device)
    images = ImageSet(task.train, task.model.config.vision.image_size, args.aug_min_scale)
    prototypes = spurious_prototypes(template_features(task.model, task.classes, get_templates(args.spurious_templates),
                                                       task.device)).to(task.device) if fd_beta else None

    def batch_loss(idx, epoch):
        x, y = images.batch(idx.tolist(), train=True)
        x, y = x.to(task.device), y.to(task.device)
        with task.ctx:
            features = encoder(x).float()
            logits = head(features)
            loss = F.cross_entropy(logits, y)
            if fd_beta:
                with torch.no_grad():
                    frozen = task.model.encode_image(x).float()
                loss = loss + fd_beta * spurious_kl(features, frozen, prototypes)
        return loss, logits, y

    val_feats = lambda: encode_items(encoder, task.val, task).to(task.device)
    score = lambda: selection_score(head(val_feats()).cpu(), task.labels(task.val))
    info = fit([encoder, head], batch_loss, len(task.train), args, score, task, "fd-align" if fd_beta else "finetune")
    logits_fn = lambda items: head(encode_items(encoder, items, task).to(task.device)).detach().cpu()
    return logits_fn, dict(info, fd_beta=fd_beta) if fd_beta else info, {"visual": encoder, "head": head}


METHOD_FNS = {"zeroshot": zeroshot, "linear-probe": linear_probe, "clip-adapter": clip_adapter,
              "tip-adapter": tip_adapter, "tip-adapter-f": tip_adapter_f, "cross-modal": cross_modal,
              "uni-modal": lambda task: cross_modal(task, use_text=False), "coop": coop,
              "finetune": finetune, "fd-align": lambda task: finetune(task, fd_beta=task.args.fd_beta)}
ENCODER_METHODS = ("finetune", "fd-align")  # their logits_fn takes items (images), the others take cached features

# ----------------------------------------------------------------------------------------------------------------
# Entry points: flags, run_method (called by train.py --method), the built-in benchmark


def add_method_args(parser):
    """Flags of the adaptation methods. train.py already defines --init, --data, --out, --epochs, --batch-size, --lr,
    --wd, --seed, --workers, --device, --precision; a shared flag not typed on the command line (train.py records
    which were, in args.typed) takes the method's default from METHOD_DEFAULTS."""
    g = parser.add_argument_group("few-shot adaptation (adapters.py)")
    g.add_argument("--method", choices=METHODS + ["aa-clip"], default=None,
                   help="adapt --init to the classes of --data (ImageFolder); aa-clip: anomaly segmentation (aa_clip.py)")
    g.add_argument("--shots", "--shot", type=int, default=16,
                   help="K training images per class (val: min(K, 4) per class); aa-clip: per category, default all")
    g.add_argument("--split-file", default=None, help="few-shot split JSON (default OUT/split_Kshot_seedS.json; reused if present)")
    g.add_argument("--templates", default="auto", help="single, imagenet7, openai80, or a file; auto: DATA/templates.txt, else single")
    g.add_argument("--aug-views", type=int, default=10, help="augmented views per training image (Tip-Adapter's augment_epoch)")
    g.add_argument("--aug-min-scale", type=float, default=0.5, help="RandomResizedCrop lower scale (Tip-Adapter: 0.5)")
    g.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without val improvement (0: run all epochs; the best val epoch is kept "
                        "either way); default: 5 for finetune and fd-align, 0 otherwise")
    g.add_argument("--head-init", choices=["zeroshot", "random"], default="zeroshot",
                   help="finetune/fd-align head: zero-shot class weights (FD-Align's CoOp_head) or random (the guide's)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="CLIP-Adapter residual ratios tried on val")
    g.add_argument("--reduction", type=int, default=4, help="CLIP-Adapter bottleneck reduction")
    g.add_argument("--adapter-side", choices=["image", "text", "both"], default="image", help="CLIP-Adapter: which features")
    # Tip-Adapter's configs range from [7, 3] (ImageNet) to [50, 50] (Flowers). A model whose own logit scale is below
    # 100 (MiniCLIP-S: 18) has a CLIP term 100 f W^T that outweighs a small alpha; on the built-in task's VAL split
    # [7, 30] beat [7, 3] at 2-16 shots, so it is the default here.
    g.add_argument("--search-scale", type=float, nargs=2, default=[7.0, 30.0], help="Tip-Adapter beta_max alpha_max")
    g.add_argument("--search-step", type=int, nargs=2, default=[200, 20], help="Tip-Adapter grid steps for beta, alpha")
    g.add_argument("--init-alpha", type=float, default=1.0, help="Tip-Adapter-F alpha while training")
    g.add_argument("--init-beta", type=float, default=1.0, help="Tip-Adapter-F beta while training")
    g.add_argument("--wise-ft", type=float, default=0.0, help="cross-modal: WiSE-FT ratio towards the zero-shot head (0: off)")
    g.add_argument("--fd-beta", type=float, default=1.0, help="FD-Align KL weight with batchmean (= the code's beta 20 / 20 prototypes)")
    g.add_argument("--spurious-templates", default="openai80", help="FD-Align's templates for spurious prototypes")
    g.add_argument("--n-ctx", type=int, default=16, help="CoOp context vectors")
    g.add_argument("--feature-cache", default=str(ROOT / "out" / "adapters" / "features"), help="folder of cached features")
    g.add_argument("--no-save", action="store_true", help="do not write the adapter checkpoint")
    return parser


def _train():
    """train.py imports this file to offer --method, so we import it lazily, when first needed."""
    import train
    return train


_MODELS, _BANKS = {}, {}  # loaded checkpoints and feature banks, reused across the runs of one process (the benchmark)


def checkpoint_tag(path):
    st = Path(path).stat()
    return f"{Path(path).stem}-{zlib.crc32(f'{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()):08x}"


def given(args, key):
    """Was --key typed on train.py's command line (args.typed)? A Namespace built in code has no args.typed: there
    every value that is not None counts as given."""
    typed = getattr(args, "typed", None)
    return getattr(args, key, None) is not None and (typed is None or key in typed)


def resolve(args):
    """Fill the shared flags with the method's defaults where they were not given."""
    hp = argparse.Namespace(**vars(args))
    for k in SHARED:
        if not given(args, k):
            setattr(hp, k, METHOD_DEFAULTS.get(args.method, {}).get(k, 0))
    if hp.patience is None:
        hp.patience = METHOD_DEFAULTS.get(args.method, {}).get("patience", 0)
    if args.data is None:
        hp.data = str(ensure_fewshot_shapes())
    if not given(args, "out"):
        hp.out = str(ROOT / "out" / "adapters" / "runs" / f"{args.method}-{args.shots}shot-seed{args.seed}")
    return hp


def load_frozen(init, device):
    if init not in _MODELS:
        _MODELS[init] = load_checkpoint(init).to(device).eval().requires_grad_(False)
    return _MODELS[init]


def build_task(args, device, ctx):
    model = load_frozen(args.init, device)
    split_file = args.split_file or str(Path(args.out) / f"split_{args.shots}shot_seed{args.seed}.json")
    split = make_few_shot(args.data, args.shots, args.seed, split_file)
    tag = checkpoint_tag(args.init)
    if tag not in _BANKS:
        _BANKS[tag] = FeatureBank(model, device, ctx, Path(args.feature_cache) / f"{tag}-views{args.aug_min_scale}.pt",
                                  args.aug_min_scale)
    names = [c.replace("_", " ") for c in split["classes"]]
    templates = get_templates(args.templates if args.templates != "auto" else
                              str(Path(args.data) / "templates.txt") if (Path(args.data) / "templates.txt").exists() else "single")
    text = template_features(model, names, templates, device)
    return Task(model, device, ctx, _BANKS[tag], names, [tuple(x) for x in split["train"]],
                [tuple(x) for x in split["val"]], text, args), split["classes"], templates


def final_test(task, logits_fn, method, folder_classes):
    """Read the test split (for the first and only time) and score the selected model."""
    items = read_test(task.args.data, folder_classes)
    logits = logits_fn(items) if method in ENCODER_METHODS else logits_fn(task.features(items))
    return accuracy(logits, task.labels(items)), len(items)


def run_method(args):
    """python train.py --method M --init CKPT --data DIR --shots K --seed S: adapt, select on val, test once.
    Writes OUT/results.json (and OUT/adapter.pt unless --no-save); returns the results dict."""
    hp = resolve(args)
    t0, train = time.time(), _train()
    torch.manual_seed(hp.seed)
    device = train.pick_device(hp.device, 0)
    hp.precision = hp.precision or ("bf16" if device.type == "cuda" else "fp32")
    Path(hp.out).mkdir(parents=True, exist_ok=True)
    task, folder_classes, templates = build_task(hp, device, train.autocast_context(device, hp.precision))
    print(f"{hp.method}: {len(task.classes)} classes, {len(task.train)} train / {len(task.val)} val images "
          f"({hp.shots}-shot, seed {hp.seed}), {len(templates)} template(s), data {hp.data}")
    zs_train = accuracy(clip_logits(task.features(task.train), class_prototypes(task.text)), task.labels(task.train))
    logits_fn, info, modules = METHOD_FNS[hp.method](task)
    on_items = hp.method in ENCODER_METHODS
    score = lambda items: selection_score(logits_fn(items) if on_items else logits_fn(task.features(items)), task.labels(items))
    results = {"method": hp.method, "shots": hp.shots, "seed": hp.seed, "init": hp.init, "data": hp.data,
               "train_acc_zeroshot": zs_train, "train_acc": score(task.train)[0], "val_acc": score(task.val)[0], **info}
    results["test_acc"], results["test_images"] = final_test(task, logits_fn, hp.method, folder_classes)
    results["seconds"] = round(time.time() - t0, 2)
    print(f"{hp.method} {hp.shots}-shot seed {hp.seed}: val {results['val_acc']:.4f}, test {results['test_acc']:.4f} "
          f"({results['test_images']} test images, read once at the end), {results['seconds']} s")
    task.log({"final": results})
    (Path(hp.out) / "results.json").write_text(json.dumps(results, indent=2))
    if modules and not hp.no_save:
        torch.save({"method": hp.method, "classes": task.classes, "templates": templates, "results": results,
                    "modules": {k: m.state_dict() for k, m in modules.items()}}, Path(hp.out) / "adapter.pt")
    return results

# ----------------------------------------------------------------------------------------------------------------
# The built-in few-shot benchmark: shape classification on the shifted Shapes domain


def ensure_fewshot_shapes(root=None, label="colour", n_train=640, n_val=160, n_test=960, seed=1):
    """An ImageFolder of the single-object images of the *shifted* Shapes style (other shades of the colour words,
    textured backgrounds, outlined/striped fills, noise: nothing the default pretraining saw), one class per value of
    `label` ("colour" or "shape", 8 classes each). Made once from synthetic.py and cached under data/.
    Why colour by default: the default pretrained MiniCLIP-S separates the 8 colours perfectly on its own domain
    but does not encode shape at all (zero-shot and nearest-class-mean shape accuracy ~15%, chance 12.5%), so a shape
    task leaves every frozen-feature method at chance. On the shifted domain its colour zero-shot accuracy is ~70%."""
    from synthetic import COLOURS, SHAPES, ensure_shapes
    root = Path(root) if root else ROOT / "data" / f"shapes_fewshot_{label}"
    params = dict(label=label, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, classes=SHAPES + COLOURS)
    marker = root / "params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)  # an interrupted regeneration leaves no marker, so it is redone next time
    source = ensure_shapes(root / "source", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, style="shifted")
    for split in ("train", "val", "test"):
        shutil.rmtree(root / split, ignore_errors=True)
    for entry in json.loads(Path(source).read_text())["images"]:
        attrs = entry["attributes"]
        if attrs["layout"] == "single":
            folder = root / entry["split"] / attrs["objects"][0][label]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(source).parent / "images" / entry["filename"], folder / entry["filename"])
    # the dataset's hand-written prompts, as CoOp/Tip-Adapter give each dataset its own ("{} texture." for DTD)
    (root / "templates.txt").write_text("a {} shape.\na {} object on a background.\n" if label == "colour"
                                        else "a {}.\na {} on a background.\n")
    marker.write_text(json.dumps(params))
    return root


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
    """results.csv (every run), table.md (mean +- std over seeds), accuracy_vs_shots.png."""
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
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=m, linestyle="--" if m == "zeroshot" else "-")
    ax.set(xscale="log", xlabel="shots per class", ylabel="test accuracy (%)")
    ax.set_title(title.replace(", mean", "\nmean"), fontsize=9)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_shots.png", dpi=120)
    return "\n".join(md)


def benchmark(argv=None):
    p = argparse.ArgumentParser(description="Every method x shots x seeds on one ImageFolder task (CPU-friendly).",
                                conflict_handler="resolve")  # --shots: a list here, one K in add_method_args
    add_method_args(p)
    p.add_argument("--init", default=str(ROOT / "out" / "shapes" / "last.pt"), help="pretrained checkpoint")
    p.add_argument("--data", default=None, help="ImageFolder directory (default: the shifted Shapes task)")
    p.add_argument("--out", default=str(ROOT / "out" / "adapters"))
    p.add_argument("--shots", "--shot", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest for small models on a shared CPU")
    p.add_argument("--epochs", type=int, default=None, help="override every method's default")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--wd", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.init).exists():
        sys.exit(f"error: {args.init} not found: train the default model first (python train.py) or pass --init")
    args.data = args.data or str(ensure_fewshot_shapes())
    rows, t0 = [], time.time()
    for k in args.shots:
        for seed in args.seeds:
            for m in args.methods:
                run = argparse.Namespace(**vars(args))
                run.method, run.shots, run.seed, run.precision, run.no_save = m, k, seed, None, True
                run.out = str(Path(args.out) / "runs" / f"{m}-{k}shot-seed{seed}")
                run.split_file = str(Path(args.out) / "splits" / f"split_{k}shot_seed{seed}.json")
                rows.append(run_method(run))
                print(f"[benchmark] {len(rows)} runs, {time.time() - t0:.0f} s")
    title = f"Few-shot test accuracy (%), {Path(args.init).name} on {Path(args.data).name}, mean ± std over seeds {args.seeds}"
    print(write_reports(rows, args.methods, args.shots, args.out, title))
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"benchmark: {len(rows)} runs in {time.time() - t0:.0f} s -> {args.out}/table.md, results.csv, accuracy_vs_shots.png")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
        return benchmark(argv[1:])
    sys.exit("usage: python adapters.py benchmark [--init CKPT] [--data DIR] [--shots 1 2 4 8 16] [--seeds 1 2 3] "
             "[--methods ...]\n       single runs: python train.py --method M --init CKPT --data DIR --shots K --seed S")


if __name__ == "__main__":
    main()
