"""
AA-CLIP: anomaly-aware CLIP by two-stage adapter training (Ma et al., CVPR 2025, arXiv 2503.06661;
code github.com/Mwxinnn/AA-CLIP), for zero-shot anomaly detection (is this image defective?) and
segmentation (which pixels?) on categories never seen in training.

    python aa_clip.py --init out/shapes/last.pt   # built-in data: train tiles+tablet, test weave+bolt
    python train.py --method aa-clip --init out/shapes/last.pt   # the same (train.py hands its arguments here)
    python test.py anomaly --checkpoint out/aa-clip/aa_clip.pt     # evaluate again (table + overlay PNGs)
    python test.py anomaly --checkpoint out/shapes/last.pt         # the un-adapted CLIP through the same pipeline
    python aa_clip.py --init model_hub/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M.pt \\
        --data VisA_20220922 --test-data mvtec_anomaly_detection   # the paper's protocol: train VisA, test MVTec
    python aa_clip.py summary out/aa-clip/seed0 out/aa-clip/seed1      # mean +- std of finished runs

The idea. A CLIP compares an image with "a photo of a bolt" well, but not a *patch* with "a damaged bolt":
its patch tokens and its normal/abnormal sentences are not separated. AA-CLIP trains small residual adapters,
with CLIP frozen, in two stages:
  stage 1 (text): adapters after the first text blocks and a new text projection, so that the "normal" and
    "abnormal" text anchors of each class separate the patches of defective and good regions. The patch features
    come from the frozen CLIP with V-V attention ("surgery"), which keeps patch tokens local.
  stage 2 (image): adapters after the first image blocks, one projection per feature level and a detection head,
    trained to match the now frozen text anchors (segmentation loss per level + image-level cross-entropy).
At test time each level gives a patch-vs-anchor anomaly map; the maps are smoothed, upsampled and summed, and the
image score mixes the map maximum with the detection head.

Where we depart from the reference code (github.com/Mwxinnn/AA-CLIP, train.py and model/adapter.py):
  - stage 1 sums the segmentation loss over ALL levels (the reference overwrites it and trains on the last only);
  - V-V attention runs over the tokens of each image (the reference's softmax runs over the batch axis); we use the
    dual path of CLIP Surgery / AnomalyCLIP's DPAM: the ordinary path is untouched, the V-V path adds attention
    outputs only (no MLP);
  - the checkpoint of each stage is chosen on held-out images of the TRAINING categories, never on test;
  - the anomaly map's Gaussian blur on the patch grid (calculate_similarity_map in forward_utils.py blurs the grid
    before upsampling too, with kornia's gaussian_blur2d) pads the border by replication, not kornia's default
    reflection, and takes ceil(3 sigma) taps each side (the reference: 7 taps at sigma 1, 9 at sigma 1.5).
Defaults are scaled to small models (see get_args); the article's values are in each flag's help.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import CLIP_SCALE, residual_blend
from anomaly_data import (augmentation, ensure_anomaly_shapes, list_categories, loader, read_items, save_overlays,
                          split_train_val)
from anomaly_metrics import auroc, average_precision, per_category_table, pixel_ap, pixel_auroc
from checkpoints import atomic_save, CheckpointError, is_torchscript, load_checkpoint, torch_load
from model import CLIPConfig, eot_pool
from run_state import lock_run_dir
from runtime import autocast_context, error_line, pick_device, plain_warnings, precision_line, PRECISIONS
from tokenizer import tokenize
from trainer import train_and_select
from transform import ImageLoadError

ROOT = Path(__file__).resolve().parent
FORMAT = "miniclip-aa-clip"
BUILTIN_TRAIN, BUILTIN_TEST = ["tiles", "tablet"], ["weave", "bolt"]  # one texture and one object on each side
# AA-CLIP's text prompts (dataset/constants.py): states x templates, averaged per state
NORMAL_STATES = ["{}", "a {}", "the {}"]
ABNORMAL_STATES = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
TEMPLATES = ["{}.", "a photo of {}."]

# ----------------------------------------------------------------------------------------------------------
# Configuration: where the adapters and feature levels sit, scaled from AA-CLIP's ViT-L/14 (24 image layers)


@dataclass
class AAConfig:
    levels: list  # image blocks (1-based) whose patch tokens give a feature level; AA-CLIP: 6, 12, 18, 24 of 24
    image_adapt_until: int  # residual adapters after blocks 1..this; AA-CLIP: 6 of 24
    text_adapt_until: int  # AA-CLIP: 3 of 12 text blocks
    surgery_until_layer: int  # V-V attention in the last (this - 1) image blocks; AA-CLIP: 20 -> 19 of 24
    img_size: int  # input size; the positional grid is resized to it (AA-CLIP runs a 336-px CLIP at 518 px)
    image_adapt_weight: float = 0.1  # lambda of the residual blend
    text_adapt_weight: float = 0.1
    relu: bool = False  # a ReLU after the per-level projections (AA-CLIP's --relu)

    @classmethod
    def for_model(cls, clip_config, img_size=None, surgery_until_layer=None, **weights):
        """AA-CLIP's choices as fractions of the depth: 4 evenly spaced levels, image adapters up to the first
        level, text adapters in the first quarter, V-V attention from the first level on; input 2x the model's."""
        vision, text = clip_config.vision, clip_config.text
        L = vision.layers
        levels = sorted({max(1, round(L * k / 4)) for k in range(1, 5)})
        img_size = img_size or 2 * vision.image_size
        if img_size % vision.patch_size:
            raise ValueError(f"--img-size {img_size} is not a multiple of the patch size {vision.patch_size}")
        surgery = L - levels[0] + 2 if surgery_until_layer is None else surgery_until_layer
        if not 1 <= surgery <= L + 1:
            raise ValueError(f"--surgery-until-layer {surgery} must lie in 1..{L + 1} for a {L}-layer image tower "
                             "(V-V attention in the last N-1 blocks; 1: none)")
        return cls(levels, levels[0], max(1, round(text.layers / 4)), surgery, img_size, **weights)

# ----------------------------------------------------------------------------------------------------------
# The model: a frozen CLIP plus the two adapters


def projection(c_in, c_out, act):
    """AA-CLIP's SimpleAdapter / SimpleProj: a bias-free linear layer, optionally followed by LeakyReLU."""
    return nn.Sequential(nn.Linear(c_in, c_out, bias=False), *([nn.LeakyReLU()] if act else []))


def adapt_residual(x, adapter, weight):
    """AA-CLIP's residual adapter: a = A(x), rescaled per token to the norm of x, then x' = w a + (1 - w) x."""
    a = adapter(x)
    a = a * (x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    return residual_blend(x, a, weight)


def resize_positional(pos, grid):
    """(1 + n*n, width) positional embeddings -> (1 + grid*grid, width): the class row kept, the n x n patch
    rows resized bicubically (as open_clip's resize_pos_embed does); unchanged when n == grid. AA-CLIP runs a CLIP
    at twice its input size (a 336-px CLIP at 518 px), so the patch grid is larger than the one it was trained on."""
    n = math.isqrt(pos.shape[0] - 1)
    if n == grid:
        return pos
    patches = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, width, n, n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])  # (1 + grid*grid, width)


def vv_attention(attn, x):
    """V-V self-attention (CLIP Surgery, Li et al. 2023; AnomalyCLIP's DPAM): the block's own value projection
    used as query, key and value, softmax over the TOKENS of each image. x (B, L, D) -> (B, L, D)."""
    B, L, D = x.shape
    v = F.linear(x, attn.in_proj_weight[2 * D:], attn.in_proj_bias[2 * D:])  # (B, L, D): the rows of v
    v = v.view(B, L, attn.heads, D // attn.heads).transpose(1, 2)  # (B, h, L, hd)
    y = F.scaled_dot_product_attention(v, v, v)  # softmax(v v^T / sqrt(hd)) v, per image and head
    return attn.out_proj(y.transpose(1, 2).reshape(B, L, D))


def in_precision(method):
    """Runs a feature method under autocast at the model's precision (bf16 where the hardware has it) and returns
    its tensors in fp32, so the maps, losses and metrics are computed in fp32."""
    def run(self, x):
        with autocast_context(x.device, self.precision):
            out = method(self, x)
        return out.float() if torch.is_tensor(out) else ([t.float() for t in out[0]], out[1].float())
    return functools.wraps(method)(run)


class AACLIP(nn.Module):
    """A frozen CLIP with AA-CLIP's text adapter (stage 1) and image adapter (stage 2). precision: the autocast
    dtype of its towers (runtime.PRECISIONS)."""

    def __init__(self, clip, cfg: AAConfig, precision="fp32"):
        super().__init__()
        self.clip, self.cfg, self.precision = clip.eval().requires_grad_(False), cfg, precision
        tw, vw, D = clip.config.text.width, clip.config.vision.width, clip.config.embed_dim
        self.text_adapter = nn.ModuleDict({
            "adapters": nn.ModuleList([projection(tw, tw, True) for _ in range(cfg.text_adapt_until)]),
            "proj": projection(tw, D, True),  # replaces CLIP's text_projection, from a random start
        })
        self.image_adapter = nn.ModuleDict({
            "adapters": nn.ModuleList([projection(vw, vw, True) for _ in range(cfg.image_adapt_until)]),
            "seg_proj": nn.ModuleList([projection(vw, D, cfg.relu) for _ in cfg.levels]),  # one per level
            "det_proj": projection(vw, D, cfg.relu),  # the image-level head
        })
        for m in [*self.text_adapter.modules(), *self.image_adapter.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        grid = cfg.img_size // clip.config.vision.patch_size  # resized once here, not in every forward pass
        self.register_buffer("positional", resize_positional(clip.visual.positional_embedding.detach(), grid),
                             persistent=False)

    @in_precision
    def encode_text(self, tokens):
        """The text tower with an adapter after each of the first text_adapt_until blocks, pooled at EOT,
        through the new projection (B, D)."""
        c = self.clip
        # the padding after the last EOT never reaches an EOT row (causal mask): drop it
        tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]  # (B, L)
        x = c.token_embedding(tokens) + c.positional_embedding[:tokens.shape[1]]  # (B, L, width)
        for i, block in enumerate(c.transformer.resblocks):
            x = block(x, causal=True)
            if i < len(self.text_adapter["adapters"]):
                x = adapt_residual(x, self.text_adapter["adapters"][i], self.cfg.text_adapt_weight)
        x = eot_pool(c.ln_final(x), tokens)  # (B, width)
        return self.text_adapter["proj"](x)

    @in_precision
    def encode_image(self, images):
        """Stage 2 and inference: adapters after the first blocks; the patch tokens of each level through ln_post
        and that level's projection. Returns [(B, N, D) normalised] per level and the detection feature (B, D)."""
        v, ad = self.clip.visual, self.image_adapter
        x, levels = v.embed(images, self.positional), []
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x)
            if i < len(ad["adapters"]):
                x = adapt_residual(x, ad["adapters"][i], self.cfg.image_adapt_weight)
            if i + 1 in self.cfg.levels:
                levels.append(v.ln_post(x[:, 1:]))  # (B, N, width): patch tokens, class token dropped
        patches = [F.normalize(proj(t), dim=-1) for proj, t in zip(ad["seg_proj"], levels)]
        det = F.normalize(ad["det_proj"](levels[-1]), dim=-1).mean(dim=1)  # (B, D), not renormalised (AA-CLIP)
        return patches, det

    @torch.no_grad()
    @in_precision
    def surgery_features(self, images):
        """Stage 1's frozen image side (also the un-adapted baseline): from block L - surgery_until_layer + 2 on,
        a second, V-V path runs beside the ordinary one (x_vv += VVAttn(ln_1(x)), no MLP). Each level's tokens
        (V-V path where it exists) go through CLIP's own ln_post and proj, are normalised, and get the normalised
        image embedding added, as AA-CLIP does. Returns [(B, N, D)] per level and the image embedding (B, D)."""
        v = self.clip.visual
        blocks = v.transformer.resblocks
        first_vv = len(blocks) - (self.cfg.surgery_until_layer - 1)  # 0-based index of the first block with V-V
        x, x_vv, levels = v.embed(images, self.positional), None, []
        for i, block in enumerate(blocks):
            if i >= first_vv:
                x_vv = (x if x_vv is None else x_vv) + vv_attention(block.attn, block.ln_1(x))
            x = block(x)
            if i + 1 in self.cfg.levels:
                levels.append(x if x_vv is None else x_vv)
        image = F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)  # (B, D): the ordinary CLIP image embedding
        patches = [F.normalize(v.ln_post(t[:, 1:]) @ v.proj, dim=-1) + image[:, None] for t in levels]
        return patches, image

# ----------------------------------------------------------------------------------------------------------
# Text anchors, maps and losses: each formula once


def anchor_sentences(name):
    """The normal sentences of a class, then the abnormal ones."""
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal + abnormal


def text_anchors(encode_text, names, context_length, device):
    """Per class the normal and the abnormal anchor: each sentence embedding normalised, averaged per state,
    renormalised -> (C, 2, D), [:, 0] normal, [:, 1] abnormal."""
    sentences = [s for name in names for s in anchor_sentences(name)]
    f = F.normalize(encode_text(tokenize(sentences, context_length).to(device)), dim=-1)
    f = f.view(len(names), len(sentences) // len(names), -1)  # (C, S, D)
    n = len(NORMAL_STATES) * len(TEMPLATES)
    return F.normalize(torch.stack([f[:, :n].mean(dim=1), f[:, n:].mean(dim=1)], dim=1), dim=-1)


def similarity(patches, anchors):
    """100 x cosine of every patch with its image's normal and abnormal anchor: (B, N, D), (B, 2, D) -> (B, 2, g, g)."""
    s = CLIP_SCALE * patches @ anchors.transpose(1, 2)  # (B, N, 2)
    g = math.isqrt(s.shape[1])
    return s.transpose(1, 2).reshape(len(s), 2, g, g)  # (B, 2, g, g)


def upsample(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def segmentation_probs(patches, anchors, size):
    """Training: softmax over (normal, abnormal) of the upsampled similarities -> (B, 2, H, W)."""
    return upsample(similarity(patches, anchors), size).softmax(dim=1)


def gaussian_smooth(x, sigma):
    """Separable Gaussian blur of (B, C, h, w) maps, kernel radius ceil(3 sigma) (7 taps for sigma 1, as AA-CLIP).
    Edges are padded by replication: mirror padding would count a patch next to the border twice there and
    move a peak onto the border, which matters on grids of 8 or 16 patches."""
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (r, r, r, r), mode="replicate")  # (B*C, 1, h + 2r, w + 2r)
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # along rows, then columns
    return y.view(x.shape)


def anomaly_map(patches, anchors, size, sigma=1.0):
    """Testing: score (s_abnormal + 1 - s_normal) / 2 per patch, Gaussian-smoothed on the patch grid,
    upsampled -> (B, H, W). The maps of all levels are summed by the caller."""
    s = similarity(patches, anchors)
    score = (s[:, 1:] + 1 - s[:, :1]) / 2  # (B, 1, g, g); the reference's formula: a shifted, halved s_a - s_n
    if sigma > 0:
        score = gaussian_smooth(score, sigma)
    return upsample(score, size)[:, 0]


def image_score(det, anchors):
    """(<d, t_abnormal> + 1) / 2 in [0, 1], from the detection feature (B, D) and anchors (B, 2, D)."""
    return ((det * anchors[:, 1]).sum(-1) + 1) / 2


def focal_loss(probs, mask, gamma=2.0, smooth=1e-5):
    """Focal loss (Lin et al. 2017) on probabilities (B, 2, H, W) against a {0, 1} mask (B, H, W), written as
    AnomalyCLIP / AA-CLIP do: one-hot target clamped to [smooth, 1 - smooth], pt = <target, p> + smooth."""
    target = torch.stack([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)  # (B, 2, H, W)
    pt = (target * probs).sum(dim=1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(prob, target, smooth=1.0):
    """1 - soft Dice (Milletari et al. 2016), (2 |P.T| + 1) / (|P| + |T| + 1) per image, averaged."""
    p, t = prob.flatten(1), target.flatten(1)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def seg_loss(probs, mask):
    """AA-CLIP's segmentation loss: focal + Dice of the abnormal channel with the mask + Dice of the normal one
    with its complement."""
    return focal_loss(probs, mask) + dice_loss(probs[:, 1], mask) + dice_loss(probs[:, 0], 1 - mask)


def orthogonal_loss(anchors):
    """(mean over the batch of <t_normal, t_abnormal>)^2 for normalised anchors (B, 2, D): zero when they are
    orthogonal. AA-CLIP adds it with weight 0.1 in stage 1 to pull the two anchors apart."""
    return (anchors[:, 0] * anchors[:, 1]).sum(-1).mean() ** 2

# ----------------------------------------------------------------------------------------------------------
# Evaluation: per category maps, image scores and metrics


def category_name(category):
    return category.replace("_", " ")


@torch.no_grad()
def predict(model, images, anchors, adapted_image, sigma):
    """Summed anomaly maps (B, H, W) and raw image scores (B,) for a batch of one category (anchors (2, D))."""
    patches, det = model.encode_image(images) if adapted_image else model.surgery_features(images)
    a = anchors.expand(len(images), 2, -1)
    maps = sum(anomaly_map(p.float(), a, images.shape[-1], sigma) for p in patches)
    return maps, image_score(det.float(), a)


def minmax(x):
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


@torch.no_grad()
def category_metrics(model, data, root, categories, anchors_of, adapted_image, args, device, keep_maps=False):
    """{category: metrics} for each category of root; maps and image scores are min-max normalised per category
    (AA-CLIP's metrics_eval; this uses all test images of the category at once, as the reference does) and the
    image score is 0.5 max(map) + 0.5 head score (industrial data)."""
    results, kept = {}, {}
    for c in categories:
        pairs = [(it, c) for it in data(root, c)]
        maps, scores, masks, labels = [], [], [], []
        for images, label, mask, _ in loader(pairs, [c], model.cfg.img_size, args.batch_size, 0, device=device):
            m, s = predict(model, images.to(device), anchors_of(c), adapted_image, args.sigma)
            maps.append(m.cpu()), scores.append(s.cpu()), masks.append(mask[:, 0]), labels.append(label)
        maps, scores = minmax(torch.cat(maps)), minmax(torch.cat(scores))
        masks, labels = torch.cat(masks), torch.cat(labels)
        final = 0.5 * maps.flatten(1).max(dim=1).values + 0.5 * scores
        both = lambda y: 0 < int(y.sum()) < y.numel()  # AUROC and AP need good and defective images (pixels)
        results[c] = {"image_auroc": auroc(final, labels) if both(labels) else None,
                      "image_ap": average_precision(final, labels) if both(labels) else None,
                      "pixel_auroc": pixel_auroc(maps, masks) if both(masks > 0.5) else None,
                      "pixel_ap": pixel_ap(maps, masks) if both(masks > 0.5) else None,
                      "images": len(labels), "defective": int(labels.sum())}
        if keep_maps:
            kept[c] = (pairs, maps)
    return (results, kept) if keep_maps else results


def mean_of(results, key):
    """The mean over categories, leaving out those where the metric is undefined (one class only)."""
    values = [r[key] for r in results.values() if r[key] is not None]
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------------------------------------
# Training: stage 1 (text adapter), stage 2 (image adapter); the best val epoch of each is kept


def stage1_loss(model, batch, names, ortho_weight, device):
    images, _, masks, cls = (t.to(device) for t in batch)
    anchors = text_anchors(model.encode_text, names, model.clip.config.text.context_length, device)[cls]  # (B, 2, D)
    patches, _ = model.surgery_features(images)
    loss = sum(seg_loss(segmentation_probs(p, anchors, images.shape[-1]), masks[:, 0]) for p in patches)  # all levels
    return loss + ortho_weight * orthogonal_loss(anchors)


def stage2_loss(model, batch, anchors, device):
    images, labels, masks, cls = (t.to(device) for t in batch)
    a = anchors[cls]  # (B, 2, D), fixed since stage 1
    patches, det = model.encode_image(images)
    logits = torch.einsum("bd,bkd->bk", det, a)  # raw cosines, no temperature (AA-CLIP)
    seg = sum(seg_loss(segmentation_probs(p, a, images.shape[-1]), masks[:, 0]) for p in patches)
    return F.cross_entropy(logits, labels) + seg


def epoch_batches(batches, epoch):
    batches.sampler.set_epoch(epoch)  # order and augmentation: functions of (seed, epoch)
    return batches


def train_stage(name, module, loss_fn, batches, epochs, lr, validate, state, state_path, milestones=()):
    """One stage: Adam (betas 0.5, 0.999) with the lr halved at `milestones` iterations, as AA-CLIP trains, run by
    trainer.train_and_select (the best val epoch is kept). After every epoch the stage's state goes into
    state_path, so an interrupted run resumes where it stopped: the loader's order and augmentation depend only on
    (seed, epoch), so a resumed run repeats them exactly. Returns the stage's history."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.5)

    def on_epoch(record, resume_state):
        loss = float("nan") if record["loss"] is None else record["loss"]
        print(f"{name} epoch {record['epoch']}: loss {loss:.4f}, val {record['val']:.4f}"
              + (f", {record['skipped']} non-finite batches skipped" if record["skipped"] else "")
              + f" ({record['seconds']} s)")
        state[name] = resume_state
        atomic_save(state, state_path)
    if state.get(name):
        print(f"{name}: resuming after epoch {state[name]['epoch']} of {epochs}")
    best_epoch, best, history = train_and_select([module], optimizer, scheduler, lambda e: epoch_batches(batches, e),
                                                 loss_fn, validate, epochs, resume=state.get(name), on_epoch=on_epoch)
    print(f"{name}: kept epoch {best_epoch} (0: before training), val score {best:.4f}")
    return [dict(record, stage=name) for record in history]


def get_args(argv=None):
    """AA-CLIP's flags. Defaults are scaled to small models and data; the article's values (ViT-L/14-336 trained on
    all of VisA) are in each help."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="python aa_clip.py summary RUN_DIR [RUN_DIR ...] tabulates finished runs.")
    p.add_argument("--init", default=None, help="the pretrained CLIP to adapt (any checkpoint load_checkpoint reads)")
    p.add_argument("--data", default=None, help="MVTec-AD or VisA root of the training categories (default: built-in)")
    p.add_argument("--out", default=str(ROOT / "out" / "aa-clip"), help="run folder (aa_clip.pt, results.json, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="article: 16 (text), 2 (image, at 518 px)")
    p.add_argument("--shots", "--shot", type=int, default=0, help="training images per category (0: all of them)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto: bf16 where the GPU or CPU multiplies bf16 natively, else fp32")
    p.add_argument("--resume", action="store_true", help="continue OUT/aa_state.pt (or re-test a finished run)")
    p.add_argument("--text-epoch", type=int, default=10, help="stage 1 epochs (article: 5)")
    p.add_argument("--image-epoch", type=int, default=40,
                   help="stage 2 epochs (article: 20 over all of VisA; here val kept rising to 40)")
    p.add_argument("--text-lr", type=float, default=1e-3, help="stage 1 Adam lr (article: 1e-5, for 1000s of steps)")
    p.add_argument("--image-lr", type=float, default=5e-4, help="stage 2 Adam lr (article: 5e-4)")
    p.add_argument("--surgery-until-layer", type=int, default=None,
                   help="V-V attention in the last N-1 image blocks (article: 20 of 24); default: from the first "
                        "level on")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (article: 518 for a 336-px CLIP); default: 2x the model's")
    p.add_argument("--text-norm-weight", type=float, default=0.1, help="orthogonality loss weight (article: 0.1)")
    p.add_argument("--text-adapt-weight", type=float, default=0.1, help="lambda of the text adapters (article: 0.1)")
    p.add_argument("--image-adapt-weight", type=float, default=0.1, help="lambda of the image adapters (article: 0.1)")
    p.add_argument("--relu", action="store_true", help="a ReLU after the per-level projections (article's --relu)")
    p.add_argument("--train-categories", nargs="+", default=None,
                   help=f"default: all of --data ({' '.join(BUILTIN_TRAIN)} for the built-in)")
    p.add_argument("--test-data", default=None, help="data tested once at the end (default: --data)")
    p.add_argument("--test-categories", nargs="*", default=None,
                   help=f"categories of --test-data tested at the end (default: {' '.join(BUILTIN_TEST)} for the "
                        "built-in, all for another --test-data; none if --test-data is --data)")
    p.add_argument("--val-fraction", type=float, default=0.3,
                   help="share of each training category's test images held out for selection")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing of the maps, in patches (article: 1)")
    return p.parse_args(argv)


def data_plan(args):
    """The training and test data and categories the run will read, checked now, not after an hour of training."""
    builtin = args.data is None
    data = str(ensure_anomaly_shapes() if builtin else Path(args.data).resolve())  # resolved: compared below
    train_categories = args.train_categories or (BUILTIN_TRAIN if builtin else list_categories(data))
    test_data = str(Path(args.test_data).resolve()) if args.test_data else data
    check_categories(data, train_categories, "--train-categories")
    if args.test_categories is not None:
        test_categories = args.test_categories
    elif builtin and args.test_data is None:
        test_categories = BUILTIN_TEST
    else:
        test_categories = [] if test_data == data else list_categories(test_data)
    if test_data == data and set(test_categories) & set(train_categories):
        raise ValueError(f"--test-categories {sorted(set(test_categories) & set(train_categories))} are also "
                         "training categories: the zero-shot protocol tests on categories never trained on")
    check_categories(test_data, test_categories, "--test-categories")
    return {"data": data, "train_categories": train_categories, "test_data": test_data,
            "test_categories": test_categories}


def check_categories(root, categories, flag):
    unknown = sorted(set(categories) - set(list_categories(root)))
    if unknown:
        raise ValueError(f"{flag}: no categories {unknown} in {root}; it has: {', '.join(list_categories(root))}")


RESUME_KEYS = ("init", "data", "train_categories", "shots", "seed", "val_fraction", "batch_size", "text_epoch",
               "image_epoch", "text_lr", "image_lr", "text_norm_weight", "sigma")  # what defines a run, for --resume


def train_aa_clip(args):
    """Stage 1, stage 2, save OUT/aa_clip.pt, test once on the test categories; returns the results dict."""
    if args.init in (None, "scratch"):
        raise ValueError("--init CKPT is required: aa-clip adapts a pretrained CLIP (e.g. out/shapes/last.pt)")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("aa-clip trains small adapters in one process: run it with python, not torchrun")
    hp = argparse.Namespace(**{**vars(args), **data_plan(args)})
    device = pick_device(hp.device)
    precision = precision_line(device, hp.precision)
    clip = load_checkpoint(hp.init, verbose=True)
    cfg = AAConfig.for_model(clip.config, hp.img_size, hp.surgery_until_layer,
                             image_adapt_weight=hp.image_adapt_weight, text_adapt_weight=hp.text_adapt_weight,
                             relu=hp.relu)
    torch.manual_seed(hp.seed)  # the adapters' initialisation
    model = AACLIP(clip, cfg, precision).to(device)
    out = Path(hp.out)
    with lock_run_dir(out):  # one run per folder: a second one is refused, naming this one's PID
        settings = {k: getattr(hp, k) for k in RESUME_KEYS}
        settings |= {"init": str(Path(hp.init).resolve()), "config": asdict(cfg)}
        state = check_resume(out, settings, hp.resume)
        t0 = time.time()
        history = train_stages(model, hp, device, state, out / "aa_state.pt")
        print(f"trained in {time.time() - t0:.0f} s")
        save(model, out / "aa_clip.pt", hp, history)
        results = {"method": "aa-clip", "init": hp.init, "data": hp.data, "seed": hp.seed, "device": str(device),
                   "precision": precision,
                   "torch": torch.__version__, "config": asdict(cfg), "train_categories": hp.train_categories,
                   "test_categories": hp.test_categories, "train_seconds": round(time.time() - t0, 1),
                   "history": history}
        if hp.test_categories:  # the test images are read here, once, after all selection
            results["adapted"] = test_report(model, hp.test_data, hp.test_categories, hp, device, out)
            results["unadapted"] = test_report(model, hp.test_data, hp.test_categories, hp, device, out, adapted=False)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        return results


def check_resume(out, settings, resume):
    """The saved stage states of OUT/aa_state.pt for --resume ({} to start); never overwrites a run without it."""
    path = out / "aa_state.pt"
    if not resume:
        for existing in (path, out / "aa_clip.pt"):
            if existing.exists():
                raise ValueError(f"{existing} exists: pass --resume to continue (or re-test) that run, "
                                 "or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        return {"settings": settings}
    if not path.exists():
        raise ValueError(f"--resume: {path} does not exist (run without --resume to start)")
    state = torch_load(path)
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if changed:
        raise ValueError(f"--resume: {path} was trained with other settings: "
                         + "; ".join(f"{k} was {a}, now {b}" for k, (a, b) in changed.items()))
    return state


def train_stages(model, hp, device, state, state_path):
    """Stage 1 (text adapter on the V-V features), then stage 2 (image adapter, anchors frozen)."""
    train_pairs, val_pairs = split_train_val(hp.data, hp.train_categories, hp.val_fraction, hp.shots, hp.seed)
    print(f"aa-clip: {model.cfg}\ntrain {len(train_pairs)} / val {len(val_pairs)} images of "
          f"{', '.join(hp.train_categories)} ({hp.data}); test categories: {', '.join(hp.test_categories) or 'none'}")
    names, ctx_len = [category_name(c) for c in hp.train_categories], model.clip.config.text.context_length
    val_items = lambda _root, c: [it for it, cat in val_pairs if cat == c]  # category_metrics asks data(root, category)

    def val_score(adapted_image):  # mean over training categories of (pixel AUROC + image AUROC) / 2
        anchors = text_anchors(model.encode_text, names, ctx_len, device)
        r = category_metrics(model, val_items, hp.data, hp.train_categories,
                             lambda c: anchors[hp.train_categories.index(c)], adapted_image, hp, device)
        return (mean_of(r, "pixel_auroc") + mean_of(r, "image_auroc")) / 2

    batches = loader(train_pairs, hp.train_categories, model.cfg.img_size, hp.batch_size, hp.workers,
                     augmentation(False), seed=hp.seed, device=device)
    history = train_stage("text", model.text_adapter,
                          lambda b: stage1_loss(model, b, names, hp.text_norm_weight, device),
                          batches, hp.text_epoch, hp.text_lr, lambda: val_score(False), state, state_path)
    with torch.no_grad():
        anchors = text_anchors(model.encode_text, names, ctx_len, device)  # frozen from here on
    batches = loader(train_pairs, hp.train_categories, model.cfg.img_size, hp.batch_size, hp.workers,
                     augmentation(True), seed=hp.seed + 1, device=device)
    total = hp.image_epoch * len(batches)  # AA-CLIP halves the lr at iterations 16k and 32k (~15 % and 30 % of its run)
    return history + train_stage("image", model.image_adapter, lambda b: stage2_loss(model, b, anchors, device),
                                 batches, hp.image_epoch, hp.image_lr, lambda: val_score(True), state, state_path,
                                 milestones=(max(1, int(0.15 * total)), max(2, int(0.3 * total))))


def save(model, path, hp, history):
    keep = ("init", "data", "train_categories", "test_data", "test_categories", "shots", "seed", "text_norm_weight",
            "sigma")
    state = {"format": FORMAT, "init": str(Path(hp.init).resolve()), "clip_config": model.clip.config.to_dict(),
             "clip_fingerprint": fingerprint(model.clip),
             "aa_config": asdict(model.cfg), "args": {k: getattr(hp, k) for k in keep}, "history": history,
             "text_adapter": model.text_adapter.state_dict(), "image_adapter": model.image_adapter.state_dict()}
    atomic_save(state, path)
    print(f"saved {path} (adapters only; the frozen CLIP is read from {state['init']})")


def fingerprint(clip):
    """A number that changes when any weight of the frozen CLIP does (the sum of each tensor's first 256 values)."""
    return float(sum(t.detach().double().flatten()[:256].sum() for t in clip.state_dict().values()))


def load(path, init=None, img_size=None, device="cpu", precision="fp32"):
    """An AA-CLIP file (adapted, True) or any CLIP checkpoint (un-adapted, False) -> (AACLIP, adapted, saved dict)."""
    saved = None
    if Path(path).is_file() and Path(path).suffix in (".pt", ".pth") and not is_torchscript(path):
        saved = torch_load(path)
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT):
        clip = load_checkpoint(path, verbose=True)
        return AACLIP(clip, AAConfig.for_model(clip.config, img_size), precision).to(device), False, {}
    base = init or saved["init"]
    if not Path(base).exists():
        raise FileNotFoundError(f"{path} adapts the CLIP {base}, which is not there: pass --init PATH to it")
    clip = load_checkpoint(base)
    same = fingerprint(clip) == saved.get("clip_fingerprint", fingerprint(clip))
    if clip.config != CLIPConfig.from_dict(saved["clip_config"]) or not same:  # from_dict: later keys get defaults
        raise CheckpointError(f"{base} is not the CLIP {path} was trained on (its weights differ); pass --init")
    cfg = AAConfig(**saved["aa_config"])
    if img_size and img_size != cfg.img_size:
        cfg = AAConfig(**dict(saved["aa_config"], img_size=AAConfig.for_model(clip.config, img_size).img_size))
    model = AACLIP(clip, cfg, precision)
    model.text_adapter.load_state_dict(saved["text_adapter"])
    model.image_adapter.load_state_dict(saved["image_adapter"])
    return model.to(device), True, saved


def resolve_test_data(args, saved):
    """test.py anomaly: --data/--categories, else the AA-CLIP file's test data, else the built-in test categories."""
    trained = saved.get("args", {})
    if args.data:
        root = args.data
        categories = args.categories or list_categories(root)
    elif trained.get("test_categories"):
        root, categories = trained["test_data"], args.categories or trained["test_categories"]
    else:
        root, categories = str(ensure_anomaly_shapes()), args.categories or BUILTIN_TEST
    check_categories(root, categories, "--categories")
    if args.sigma is None:
        args.sigma = trained.get("sigma", 1.0)  # the smoothing the run selected its checkpoint with
    same_data = bool(trained.get("data")) and Path(root).resolve() == Path(trained["data"]).resolve()
    seen = set(categories) & set(trained.get("train_categories", [])) if same_data else set()
    if seen:
        print(f"warning: {sorted(seen)} were training categories of this checkpoint: not a zero-shot result")
    return root, categories


def test_report(model, root, categories, hp, device, out, adapted=True):
    """Evaluate on the test categories (read here, once), print and write the table and the overlays."""
    ctx_len = model.clip.config.text.context_length
    names = [category_name(c) for c in categories]
    with torch.no_grad():
        encode = model.encode_text if adapted else model.clip.encode_text
        anchors = text_anchors(encode, names, ctx_len, device)
    results, kept = category_metrics(model, lambda r, c: read_items(r, c, "test"), root, categories,
                             lambda c: anchors[categories.index(c)], adapted, hp, device, keep_maps=True)
    table = per_category_table(results)
    title = "AA-CLIP (adapted)" if adapted else "CLIP (un-adapted: V-V patch features, CLIP's own text anchors)"
    print(f"\n{title} on {root}:\n{table}")
    tag = "" if adapted else "_unadapted"
    save_overlays(kept, Path(out) / f"overlays{tag}", model.cfg.img_size)
    (Path(out) / f"table{tag}.md").write_text(f"{title}\n\n{table}\n")
    print(f"wrote {Path(out) / f'table{tag}.md'} and anomaly-map overlays in {Path(out) / f'overlays{tag}'}/")
    return {"test": results, "mean": {k: mean_of(results, k) for k in ("image_auroc", "pixel_auroc", "pixel_ap")}}


def summary(folders):
    """Mean +- std over runs (e.g. seeds) of the test metrics in each folder's results.json, adapted vs un-adapted."""
    if not folders:
        raise ValueError("usage: python aa_clip.py summary RUN_DIR [RUN_DIR ...]")
    missing = [str(f) for f in folders if not (Path(f) / "results.json").is_file()]
    if missing:
        raise ValueError(f"no results.json in {', '.join(missing)} (an unfinished run? --resume finishes it)")
    runs = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    if any("adapted" not in r for r in runs) or len({tuple(r["test_categories"]) for r in runs}) != 1:
        raise ValueError("every run must have test results on the same test categories")
    keys = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP")]
    lines = [f"Zero-shot test categories {', '.join(runs[0]['test_categories'])}, mean +- std over {len(runs)} run(s) "
             f"(seeds {', '.join(str(r.get('seed', '?')) for r in runs)})\n",
             "| model | category | " + " | ".join(t for _, t in keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for model in ("unadapted", "adapted"):
        for c in runs[0]["test_categories"] + ["mean"]:
            cells = []
            for k, _ in keys:
                v = [r[model]["mean"][k] if c == "mean" else r[model]["test"][c][k] for r in runs]
                v = 100 * np.array([np.nan if x is None else x for x in v])  # None: undefined (one class only)
                cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
            name = "AA-CLIP" if model == "adapted" else "CLIP, no adapters"
            lines.append(f"| {name} | {c} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def main(argv=None):
    """python aa_clip.py [flags] trains and tests (also python train.py --method aa-clip [flags]);
    python aa_clip.py summary RUN_DIR ... tabulates finished runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    plain_warnings()
    try:
        if argv[:1] == ["summary"]:
            return summary(argv[1:])
        return train_aa_clip(get_args(argv))
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:
        message = error_line(e)
    sys.exit(f"error: {message}")  # bad input: one readable line naming the file or flag, no traceback


if __name__ == "__main__":
    main()
