"""
Contrastive training of CLIP with the symmetric InfoNCE loss (or SigLIP's sigmoid loss), as one plain PyTorch loop
(no Trainer).

    python train.py                      # built-in Shapes data, small model from scratch, ~10 min on 2 CPU cores
    python train.py --init model_hub/TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt \
        --data dataset_flickr30k.json --images flickr30k-images --lr 1e-5 --epochs 5
    torchrun --nproc_per_node 2 train.py ...   # DDP: NCCL on GPUs, gloo on CPU
    python train.py --method tip-adapter --init out/shapes/last.pt ...   # few-shot adaptation instead: adapters.py
    python train.py --method aa-clip --init out/shapes/last.pt ...       # anomaly adapters instead: aa_clip.py

References: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) Figure 3 pseudocode and section 2.5
(training details); open_clip's train.py/loss.py (https://github.com/mlfoundations/open_clip) for the
optimizer groups, the cosine schedule and gathering features across processes; SigLIP (Zhai et al. 2023,
https://arxiv.org/abs/2303.15343) section 3; nanoGPT's train.py for the layout.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from adapters import METHODS as FEW_SHOT_METHODS
from checkpoints import CheckpointError, load_checkpoint
from grad_cache import chunked_backward
from label_prompts import KINDS as PROMPT_KINDS, LabelPrompts
from losses import batch_loss
from model import CLIP, CLIPConfig
from negatives import KINDS, mined_odds
from run_state import (data_digest, lock_run_dir, read_run_checkpoint, restore_state, resumed_args, save_state,
                       StopRequest, trim_metrics)
from runtime import (autocast_context, equalise_batch, error_line, int_at_least, log_metrics, pick_device,
                     plain_warnings, precision_line, PRECISIONS, setup_distributed)
from train_data import check_unreadable, read_splits, resolve_data, train_loader
from trainer import get_lr
from transform import ImageLoadError

ROOT = Path(__file__).resolve().parent
METHODS = ["aa-clip"] + FEW_SHOT_METHODS  # --method M: aa_clip.py's or adapters.py's, with the other arguments


def negative_kinds(text):
    """The --negative-kinds flag: a comma-separated list of negatives.KINDS, checked, returned as given."""
    unknown = [k for k in text.split(",") if k not in KINDS]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown or [text]}; choose from {','.join(KINDS)}")
    return text


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "--method M hands the other arguments to adapters.py (few-shot methods) or aa_clip.py (aa-clip), which have "
        "their own flags: python train.py --method M --help"), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="model JSON (default for --init scratch: model_configs/"
                   "MiniCLIP-S-64px.json; with a checkpoint it is checked against the checkpoint's shapes)")
    p.add_argument("--init", default="scratch",
                   help="'scratch', or any checkpoint load_checkpoint reads (TinyCLIP .pt, HF dir, ...)")
    p.add_argument("--data", default=None,
                   help="caption file (Karpathy JSON, Flickr8k.token.txt, list JSON, CSV); default: built-in Shapes")
    p.add_argument("--images", default=None, help="image root of --data")
    p.add_argument("--train-split", default="train", help="split trained on ('' for every entry of --data)")
    p.add_argument("--val-split", default=None, help="split for --eval-every ('' to skip; default: val, if present)")
    p.add_argument("--test-split", default=None, help="split evaluated once at the end ('' to skip; default: test, "
                   "if present)")
    p.add_argument("--out", default=str(ROOT / "out" / "shapes"), help="run directory: last.pt, metrics.jsonl, plot")
    p.add_argument("--epochs", type=int_at_least(1), default=15, help="passes over the training split")
    p.add_argument("--max-steps", type=int_at_least(0), default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--batch-size", type=int_at_least(2), default=128,
                   help="per process, at least 2 (one pair has no negative); the loss sees batch-size x processes")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (matrices only: see configure_optimizer)")
    p.add_argument("--text-lr-scale", type=float, default=None, help="the text tower's learning rate as a multiple "
                   "of --lr (default: 0.3 from scratch, 1 from a checkpoint, where one rate for all is the norm)")
    p.add_argument("--warmup", type=int_at_least(0), default=50, help="linear warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation")
    p.add_argument("--workers", type=int_at_least(0), default=None,
                   help="DataLoader worker processes for training (default: evaluate.loader_workers' choice; 0 for "
                        "tar shards, whose batches depend on it)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto: bf16 where the GPU or CPU multiplies bf16 natively, else fp32")
    p.add_argument("--hard-negatives", type=int_at_least(0), default=3,
                   help="NegCLIP hard-negative captions per image (negatives.py; 0: plain CLIP loss)")
    p.add_argument("--negative-kinds", type=negative_kinds, default="shape,size,binding,order,place",
                   help=f"which changes make the hard negatives, comma-separated, from {','.join(KINDS)} (colour is "
                   "left out by default: a random batch already tells colours apart)")
    p.add_argument("--hard-negative-weight", type=float, default=2.0,
                   help="weight of hard_negative_loss, each image against its own hard negatives only (0: off)")
    p.add_argument("--label-prompts", choices=[*PROMPT_KINDS, ""], default=None,
                   help="UniCL label prompts (label_prompts.py): each image whose caption names one class of this "
                        "attribute also picks its class among all the class prompts (\"a circle\", ...), every "
                        "step; '' for none (default: shape on the built-in Shapes data, none with --data, whose "
                        "captions may use these words otherwise: \"a town square\")")
    p.add_argument("--label-prompt-weight", type=float, default=2.0,
                   help="weight of label_prompt_loss (0: off)")
    p.add_argument("--mine-every", type=int_at_least(0), default=0,
                   help="every this many steps (e.g. 50), draw the new shape or colour word of hard negatives by the "
                        "model's own confusions (negatives.confusable; 0: every other word equally likely)")
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip",
                   help="clip: softmax InfoNCE (clip_loss); siglip: sigmoid pairs with a learnable bias (siglip_loss; "
                        "the model gets a logit bias at -10 and the temperature starts at 10)")
    p.add_argument("--accum-chunks", type=int_at_least(1), default=1,
                   help="encode each batch in K chunks (torch.chunk: fewer when B does not split evenly) and "
                        "backpropagate the full batch's loss chunk by chunk (GradCache, chunked_backward): the same "
                        "step with one chunk's activations in memory, for one more forward pass")
    p.add_argument("--lock-image", type=int_at_least(0), nargs="?", const=0, default=None, metavar="N",
                   help="LiT: freeze the image tower (CLIP.lock), all but its last N blocks if N is given; for a "
                        "pretrained --init")
    p.add_argument("--lock-text", type=int_at_least(0), nargs="?", const=0, default=None, metavar="N",
                   help="freeze the text tower, all but its last N blocks if N is given")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each residual block in the backward pass: less memory for a larger batch, slower")
    p.add_argument("--save-every", type=int_at_least(1), default=200,
                   help="steps between checkpoints (also saved before each evaluation and at the end)")
    p.add_argument("--eval-every", type=int_at_least(0), default=150,
                   help="steps between validation recalls (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--method", choices=METHODS, default=None, help="adapt a pretrained CLIP instead (see below)")
    args = p.parse_args(argv)
    if args.accum_chunks > args.batch_size:
        p.error(f"--accum-chunks {args.accum_chunks} is more chunks than --batch-size {args.batch_size} has images")
    if args.text_lr_scale is None:  # from scratch a slower text tower learns more (README, the probe's ablation)
        args.text_lr_scale = 0.3 if args.init == "scratch" else 1.0
    if args.label_prompts is None:  # the Shapes captions' shape words name the shape drawn; elsewhere they may not
        args.label_prompts = "shape" if args.data is None else ""
    return args


def configure_optimizer(model, lr, wd, text_lr_scale=1.0):
    """AdamW with betas (0.9, 0.98), eps 1e-6 (CLIP section 2.5). Weight decay applies to matrices only: gains,
    biases, class/positional embeddings and logit_scale are excluded (decaying the temperature or the position
    table towards zero is not a sensible prior). With text_lr_scale != 1 the text tower's parameters get groups of
    their own whose "lr_scale" the schedule multiplies the learning rate by (the image tower, the temperature and
    SigLIP's bias: 1). Why a slower text tower helps from scratch: README, "What the default model understands"."""
    def no_decay(name, p):
        return p.ndim < 2 or name.endswith(("class_embedding", "positional_embedding")) or name == "logit_scale"

    def scale_of(name):
        return 1.0 if name.startswith("visual.") or name in ("logit_scale", "logit_bias") else text_lr_scale
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for scale in sorted({scale_of(n) for n, _ in params}, reverse=True):  # one scale (1.0): the two usual groups
        mine = [(n, p) for n, p in params if scale_of(n) == scale]
        groups += [{"params": [p for n, p in mine if not no_decay(n, p)], "weight_decay": wd, "lr_scale": scale},
                   {"params": [p for n, p in mine if no_decay(n, p)], "weight_decay": 0.0, "lr_scale": scale}]
    decay = sum(len(g["params"]) for g in groups if g["weight_decay"])
    print(f"optimizer: {decay} tensors with weight decay {wd}, {len(params) - decay} without"
          + (f"; text tower at {text_lr_scale:g}x the learning rate" if text_lr_scale != 1 else ""))
    fused = params[0][1].device.type in ("cpu", "cuda")  # one kernel for the whole update instead of ~7 passes
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def train_step(model, images, tokens, optimizer, scaler, ctx, grad_clip, hard_negative_weight=0.0, chunks=1,
               prompts=None):
    """One optimisation step; returns (loss, grad norm), or (loss, None) when the loss or the gradient is not
    finite (the step is skipped and the weights are untouched). tokens (B, L), or (B, 1 + K, L) with K hard
    negatives per caption after the true one (all-zero rows: none), which also add hard_negative_weight times
    hard_negative_loss. A model with a logit bias (CLIPConfig.init_logit_bias) trains with siglip_loss, any
    other with clip_loss. chunks > 1: the same step with one chunk's activations in memory (chunked_backward).
    prompts (LabelPrompts): its C prompts go through the text tower with the captions, for label_prompt_loss."""
    captions = tokens if tokens.ndim == 2 else tokens.flatten(0, 1)  # (B, L) or (B * (1 + K), L)
    extra = 0
    if prompts is not None:  # one pass of the text tower for the captions and the prompts
        captions, extra = torch.cat([captions, prompts.tokens.to(captions.device)]), len(prompts)  # (B*(1+K)+C, L)
    loss_of = partial(batch_loss, tokens=tokens, hard_negative_weight=hard_negative_weight, prompts=prompts)
    if chunks > 1:
        loss = chunked_backward(model, images, captions, loss_of, chunks, ctx, scaler, extra)
    else:
        with ctx:  # the towers run under autocast; the loss is computed in fp32
            image_features, text_features, logit_scale = model(images, captions)
        bias = (model.module if hasattr(model, "module") else model).logit_bias
        loss = loss_of(image_features.float(), text_features.float(), logit_scale.float(),
                       None if bias is None else bias.float())
        if torch.isfinite(loss):
            scaler.scale(loss).backward()
    if not torch.isfinite(loss):  # skip: one bad batch must not poison the weights
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), None
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's GradScaler skips such steps by itself
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP section 2.5: the temperature is clipped so the logits are scaled by at most 100
        (model.module if hasattr(model, "module") else model).logit_scale.clamp_(0, math.log(100))
    return loss.item(), grad_norm.item()


def evaluate(model, records, images, split, device, precision):
    """Image<->text recall on one split of the training data (evaluate.py; FAISS exact search; its DataLoader
    workers and threads are chosen for the image size and the cores free now)."""
    from evaluate import evaluate_retrieval, format_results
    results = evaluate_retrieval(model, records, images, protocol="5cap", split_name=split,
                                 batch_size=256, device=device, precision=precision)
    print(format_results(results))
    return results


def final_evaluation(model, splits, images, device, precision, out, probe):
    """Validation, then the test split, evaluated once, here; results_{val,test}.json and the training plot. With
    probe (the built-in data), also the zero-shot probe suite on new scenes (probe.py): probe.json."""
    model.eval()
    for name in ("val", "test"):
        if splits[name] is not None:
            results = evaluate(model, splits[name], images, name, device, precision)
            log_metrics(out, {"step": "final", name: results})
            (out / f"results_{name}.json").write_text(json.dumps(results, indent=2))
    if probe:
        from probe import format_probe, run_probe
        results = run_probe(model, device, precision)
        print(format_probe(results))
        log_metrics(out, {"step": "final", "probe": results})
        (out / "probe.json").write_text(json.dumps(results, indent=2))
    from plot import plot_metrics
    print(f"plot: {plot_metrics(out / 'metrics.jsonl', out / 'metrics.png')}")


def make_model(args, device):
    """The model to train on device: from scratch (args.config, default MiniCLIP-S-64px) or from args.init, with
    the towers locked (LiT) and gradient checkpointing as the flags ask."""
    if args.init == "scratch":
        config = CLIPConfig.from_json(args.config or ROOT / "model_configs" / "MiniCLIP-S-64px.json")
        if args.loss == "siglip":  # SigLIP section 3: t' = log 10, b = -10 (open_clip's SigLIP configs)
            config = replace(config, init_logit_scale=math.log(10), init_logit_bias=-10.0)
        model = CLIP(config)
    else:  # a --config given with a checkpoint is checked against the checkpoint's shapes
        model = load_checkpoint(args.init, config=args.config, verbose=True)
        if (model.logit_bias is not None) != (args.loss == "siglip"):
            raise ValueError(f"--loss {args.loss}: {args.init} was trained with the "
                             f"{'siglip' if model.logit_bias is not None else 'clip'} loss (a model has a logit bias "
                             "for siglip only); pass that --loss")
    model.to(device)
    for tower, unlocked in (("image", args.lock_image), ("text", args.lock_text)):
        if unlocked is not None:  # before the optimizer is built: it then holds no state for frozen weights
            try:
                model.lock(tower, unlocked)
            except ValueError as e:
                raise ValueError(f"--lock-{tower} {unlocked}: {e}") from None
            print(f"locked the {tower} tower" + (f", all but its last {unlocked} blocks" if unlocked else "")
                  + (" (note: of a model trained from scratch, which keeps it random)" if args.init == "scratch"
                     else ""))
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.accum_chunks > 1 and any(isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad
                                     for m in model.modules()):
        print(f"note: --accum-chunks: the conv stem's BatchNorm normalises each chunk of {args.batch_size} / "
              f"{args.accum_chunks} images on its own (and updates its running statistics once per chunk), so the "
              "step is close to, not exactly, the unchunked one")
    return model


# -----------------------------------------------------------------------------
# The run: setup, the training loop, the final evaluation


def train(args, argv=()):
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    if not master:  # only rank 0 prints, logs, saves and evaluates
        sys.stdout = open(os.devnull, "w")
    device = pick_device(args.device, local_rank)
    out, ckpt_path = Path(args.out), Path(args.out) / "last.pt"
    lock = lock_run_dir(out) if master else None  # held until the process ends: one run per folder
    ckpt = read_run_checkpoint(ckpt_path) if args.resume else None
    if ckpt:
        args = resumed_args(args, argv, ckpt["args"], world)
    elif master and any(p.name != ".lock" for p in out.iterdir()):
        raise ValueError(f"{out} holds an earlier run ({', '.join(sorted(p.name for p in out.iterdir())[:4])}): "
                         "pass --resume to continue it, or choose another --out")
    precision = precision_line(device, args.precision)
    ctx = autocast_context(device, precision)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    model = make_model(args, device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters ({args.init}), device {device}, "
          f"precision {precision}, {world} process(es)")
    data, images = resolve_data(args.data, args.images, rank, world)
    splits = read_splits(args, data, images)
    loader, sampler, odds = train_loader(args, splits["train"], images, model.config, device, rank, world, data)
    for kind, saved in (ckpt or {}).get("odds", {}).items():  # the mined odds in use when the run was saved
        odds[kind].copy_(saved)
    steps_per_epoch = len(loader)  # read before set_epoch(start=...), which shortens the epoch being resumed
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    optimizer = configure_optimizer(model, args.lr, args.wd, args.text_lr_scale)
    prompts = None
    if args.label_prompts and args.label_prompt_weight:  # UniCL label prompts (label_prompts.py)
        prompts = LabelPrompts(args.label_prompts, model.config.text.context_length, args.label_prompt_weight, device)
        print(f"label prompts: {len(prompts)} {prompts.kind} classes ({', '.join(prompts.names)}), weight "
              f"{prompts.weight:g}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = restore_state(ckpt, model, optimizer, scaler) if ckpt else 0
    ddp_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
    run = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    run.update(data=data, images=images, precision=precision, total_steps=total_steps, world=world,
               data_sha256=data_digest(data))
    if master:
        trim_metrics(out / "metrics.jsonl", step)
    print(f"training: {total_steps} steps ({steps_per_epoch} per epoch), global batch {args.batch_size * world}"
          + (f", resuming at step {step}" if step else ""))

    t_start, seen, bad_images, first_bad, non_finite = time.time(), 0, 0, [], 0
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    with StopRequest() as stop:
        while step < total_steps:
            epoch, epoch_start = step // steps_per_epoch, step
            # a resumed run restarts part-way through its epoch: the sampler skips the batches already used
            sampler.set_epoch(epoch, start=(step % steps_per_epoch) * args.batch_size * world)
            model.train()
            t_data = time.time()
            for batch_images, tokens, bad in loader:
                seen += batch_images.shape[0] + len(bad)
                if bad:
                    bad_images, first_bad = bad_images + len(bad), (first_bad + bad)[:3]
                    tqdm.write(f"warning: skipped {len(bad)} unreadable image(s), {bad_images} so far: {bad[0]}")
                    check_unreadable(bad_images, seen, first_bad, 4 * args.batch_size * world)
                batch_images, tokens = equalise_batch(batch_images.to(device, non_blocking=True),
                                                      tokens.to(device, non_blocking=True), world)
                if batch_images.shape[0] < 2:  # (nearly) every image of the batch was unreadable: no pairs to contrast
                    continue  # equalise_batch made the size equal on every process, so all of them skip together
                t_step = time.time()
                if odds and step % args.mine_every == 0:  # hard negatives of what the model confuses now
                    for kind, new in mined_odds(model, list(odds), ctx).items():
                        odds[kind].copy_(new)
                lr = get_lr(step, args.lr, args.warmup, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # runs saved before lr_scale: 1
                loss, grad_norm = train_step(ddp_model, batch_images, tokens, optimizer, scaler, ctx, args.grad_clip,
                                             args.hard_negative_weight, args.accum_chunks, prompts)
                step += 1
                if grad_norm is None:  # a non-finite step was skipped; five in a row stop the run
                    non_finite += 1
                    tqdm.write(f"warning: non-finite loss {loss} at step {step}: step skipped ({non_finite} in a row)")
                    if non_finite >= 5:
                        if master:
                            save_state(ckpt_path, model, optimizer, scaler, step - 1, run, odds)
                        raise ValueError(f"{non_finite} non-finite losses in a row: stopping (weights before them "
                                         f"are in {ckpt_path}); try a lower --lr or --precision fp32/bf16")
                else:
                    non_finite = 0
                t_end = time.time()
                evaluate_now = args.eval_every and step % args.eval_every == 0 and splits["val"] is not None
                if master:
                    sps, scale = batch_images.shape[0] * world / (t_end - t_data), model.logit_scale.exp().item()
                    log_metrics(out, {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                      "logit_scale": scale, "bad_images": bad_images, "samples_per_s": sps,
                                      "data_wait": (t_step - t_data) / (t_end - t_data)})
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", scale=f"{scale:.1f}", sps=f"{sps:.0f}")
                    bar.update(1)
                    if step % args.save_every == 0 or step == total_steps or evaluate_now or stop.requested:
                        save_state(ckpt_path, model, optimizer, scaler, step, run, odds)  # saved before evaluating
                    if evaluate_now:
                        log_metrics(out, {"step": step, "val": evaluate(model, splits["val"], images, "val",
                                                                         device, precision)})
                        model.train()
                if stop.requested:
                    sys.exit(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume")
                if world > 1 and args.eval_every and step % args.eval_every == 0:
                    dist.barrier()  # the others wait while rank 0 evaluates (no collectives inside evaluation)
                if step >= total_steps:
                    break
                t_data = time.time()
            if step == epoch_start:  # an epoch without a single usable batch would repeat forever
                raise ValueError(f"epoch {epoch} had no usable batch ({bad_images} unreadable images, e.g. "
                                 f"{', '.join(first_bad) or 'none'}): check the images under {images}")
    bar.close()
    print(f"trained {step} steps in {time.time() - t_start:.0f} s; checkpoint: {ckpt_path}")

    if master:
        final_evaluation(model, splits, images, device, precision, out, probe=args.data is None)
        lock.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    """python train.py trains CLIP; python train.py --method M ... runs adapters.py or aa_clip.py with the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", choices=METHODS)
    known, rest = method.parse_known_args(argv)
    if known.method == "aa-clip":
        import aa_clip
        return aa_clip.main(rest)
    if known.method:
        import adapters
        return adapters.main(["--method", known.method] + rest)
    plain_warnings()
    args = get_args(argv)
    try:
        return train(args, argv)
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:
        message = error_line(e)
    sys.exit(f"error: {message}")  # bad input: one readable line naming the file or flag (outside the except block,
    # so the failed run's frames, and its lock on --out, are released before the exit)


if __name__ == "__main__":
    main()
