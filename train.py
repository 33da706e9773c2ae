"""
Contrastive training of CLIP with the symmetric InfoNCE loss, as one plain PyTorch loop (no Trainer).

    python train.py                      # built-in Shapes data, small model from scratch, ~10 min on 2 CPU cores
    python train.py --init model_hub/TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt \
        --data dataset_flickr30k.json --images flickr30k-images --lr 1e-5 --epochs 5
    torchrun --nproc_per_node 2 train.py ...   # DDP: NCCL on GPUs, gloo on CPU

References: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) Figure 3 pseudocode and section 2.5
(training details); open_clip's train.py/loss.py (https://github.com/mlfoundations/open_clip) for the
optimizer groups, the cosine schedule and gathering features across processes; nanoGPT's train.py for the layout.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import check_images, collate_skip_bad, count_truncated, CaptionTrainDataset, EpochSampler, read_captions
from checkpoints import load_checkpoint, save_checkpoint
from model import CheckpointError, CLIP, CLIPConfig
from transform import ImageLoadError, image_transform

ROOT = Path(__file__).resolve().parent
RUN_KEYS = ("config", "init", "data", "images", "train_split", "epochs", "max_steps", "batch_size", "lr", "wd",
            "warmup", "grad_clip", "seed", "precision")  # what --resume takes from the checkpoint


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "model_configs" / "MiniCLIP-S-64px.json"), help="model JSON (for --init scratch)")
    p.add_argument("--init", default="scratch", help="'scratch', or any checkpoint load_checkpoint reads (TinyCLIP .pt, HF dir, ...)")
    p.add_argument("--data", default=None, help="caption file (Karpathy JSON, Flickr8k.token.txt, list JSON, CSV); default: built-in Shapes")
    p.add_argument("--images", default=None, help="image root of --data")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="split for --eval-every ('' to skip)")
    p.add_argument("--test-split", default="test", help="split evaluated once at the end ('' to skip)")
    p.add_argument("--out", default=str(ROOT / "out" / "shapes"), help="run directory: last.pt, metrics.jsonl, plot")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--batch-size", type=int, default=128, help="per process; the loss sees batch-size x processes pairs")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on gains, biases, class/positional embeddings, logit_scale)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast dtype (default: bf16 on CUDA, fp32 otherwise)")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (also saved at the end)")
    p.add_argument("--eval-every", type=int, default=150, help="steps between validation recall evaluations (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    from aa_clip import add_args as add_anomaly_args  # AA-CLIP's flags (aa_clip.py)
    from adapters import add_method_args  # --method and the few-shot adapters' flags (adapters.py)
    add_anomaly_args(add_method_args(p))
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: the flags given on the command line
        action.default = argparse.SUPPRESS
    args.typed = set(vars(p.parse_args(argv)))  # a method fills the shared flags not typed with its own defaults
    return args


# -----------------------------------------------------------------------------
# The loss


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric InfoNCE (CLIP Figure 3): the i-th image and the i-th caption are the positive pair, every other
    pairing in the batch is a negative. Cross-entropy over each row (image -> captions) and each column
    (caption -> images) of the scaled cosine-similarity matrix, averaged. Features must be L2-normalised."""
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    logits_per_text = logits_per_image.T  # (B, B)
    labels = torch.arange(image_features.shape[0], device=image_features.device)  # the diagonal
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def gather_with_grad(x):
    """All processes' features, concatenated in rank order, so the loss sees the global batch as negatives.
    torch.distributed.nn.all_gather passes gradients back to each process's own shard (a plain dist.all_gather
    would cut the graph). Every process then computes the same global loss; DDP averages the gradients, which
    gives exactly the single-process gradient on the global batch (open_clip loss.py, gather_with_grad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn  # registers the autograd-aware collectives
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)  # (world * B, D)


# -----------------------------------------------------------------------------
# Optimizer and schedule


def configure_optimizer(model, lr, wd):
    """AdamW with betas (0.9, 0.98), eps 1e-6 (CLIP section 2.5). Weight decay applies to matrices only: gains,
    biases, class/positional embeddings and logit_scale are excluded (decaying the temperature or the position
    table towards zero is not a sensible prior)."""
    def no_decay(name, p):
        return p.ndim < 2 or name.endswith(("class_embedding", "positional_embedding")) or name == "logit_scale"
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if not no_decay(n, p)]
    other = [p for n, p in params if no_decay(n, p)]
    print(f"optimizer: {len(decay)} tensors with weight decay {wd}, {len(other)} without")
    fused = params[0][1].device.type in ("cpu", "cuda")  # one kernel for the whole update instead of ~7 passes
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def get_lr(step, peak, warmup, total):
    """Linear warmup to the peak, then cosine decay to 0 (open_clip cosine_lr)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * peak


# -----------------------------------------------------------------------------
# Setup: processes, device, precision


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without it this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def pick_device(name, local_rank):
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_context(device, precision):
    """Mixed precision keeps fp32 master weights and runs matmuls in bf16/fp16 (never .half() the model:
    plain fp16 weights and Adam give NaNs, openai/CLIP issue #40). fp16 also needs a GradScaler."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type == "cpu":
        sys.exit("error: --precision fp16 needs a GPU (CPU LayerNorm has no fp16 kernel); use bf16 or fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# -----------------------------------------------------------------------------
# Data


class ShardedBatches(torch.utils.data.Sampler):
    """Cuts the epoch order (data.EpochSampler) into global batches and yields this process's slice of each,
    so N processes with batch B see exactly what one process with batch N*B sees. drop_last: every step has
    the same number of negatives."""

    def __init__(self, sampler, batch_size, rank, world):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self):
        keys, g, b = list(self.sampler), self.batch_size * self.world, self.batch_size
        for start in range(0, len(keys) - g + 1, g):
            yield keys[start + self.rank * b: start + (self.rank + 1) * b]

    def __len__(self):
        return len(self.sampler) // (self.batch_size * self.world)


def build_data(args, image_size, context_length, device, rank, world):
    if args.data is None:  # the built-in dataset, generated on first use
        from synthetic import ensure_shapes
        args.data = str(ensure_shapes()) if rank == 0 else None
        if world > 1:  # wait until rank 0 has generated it
            dist.barrier()
            args.data = str(ensure_shapes())
        args.images = args.images or str(Path(args.data).parent / "images")
    if args.images is None:
        sys.exit("error: --images DIR is required with --data (the folder the caption file's image paths are relative to)")
    records = read_captions(args.data, args.train_split or None)  # '' = every entry (files without splits)
    check_images(records, args.images)
    truncated = count_truncated(records, context_length)
    print(f"data: {args.data} [{args.train_split}]: {len(records)} images, {sum(len(r.captions) for r in records)} captions"
          + (f", {truncated} captions longer than {context_length} tokens will be truncated" if truncated else ""))
    dataset = CaptionTrainDataset(records, args.images, image_transform(image_size, is_train=True), context_length, args.seed)
    sampler = EpochSampler(len(dataset), args.seed)
    batches = ShardedBatches(sampler, args.batch_size, rank, world)
    if len(batches) == 0:
        sys.exit(f"error: {len(dataset)} training images are fewer than one global batch of {args.batch_size * world}")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skip_bad, num_workers=args.workers,
                                         persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    return loader, sampler


def equalise_batch(images, tokens, world):
    """A skipped unreadable image makes one process's batch smaller; all_gather needs equal sizes, so every
    process trims its batch to the smallest one."""
    if world == 1:
        return images, tokens
    n = torch.tensor([images.shape[0]], device=images.device if images.is_cuda else "cpu")
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return images[:n.item()], tokens[:n.item()]


# -----------------------------------------------------------------------------
# Checkpoints and logging


def save_state(path, model, optimizer, scaler, step, args):
    """Everything needed to continue exactly: weights + config (checkpoints.save_checkpoint), optimizer moments,
    scaler, step, RNG states and the arguments. Tensors and plain containers only (weights_only-safe)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    run_args = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    save_checkpoint(path, model, step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    scheduler={"name": "cosine", "peak_lr": args.lr, "warmup": args.warmup, "total_steps": args.total_steps},
                    rng=rng, args={**run_args, "world": dist.get_world_size() if dist.is_initialized() else 1})


def restore_state(path, model, optimizer, scaler):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def trim_metrics(path, step):
    """A fresh run starts a new log; a resumed one drops what the interrupted run logged after its last save."""
    if path.exists():
        records = [json.loads(line) for line in path.read_text().splitlines()] if step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in records if isinstance(r["step"], int) and r["step"] <= step))


def log_metrics(out, record):
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate(model, args, split, device):
    """Image<->text recall on one split of the training data (evaluate.py; FAISS exact search)."""
    from evaluate import evaluate_retrieval, format_results
    records = read_captions(args.data, split or None)
    results = evaluate_retrieval(model, records, args.images, protocol="5cap", split_name=split,
                                 batch_size=256, workers=args.workers, device=device)
    print(format_results(results))
    return results


# -----------------------------------------------------------------------------
# The training loop


def train_step(model, images, tokens, optimizer, scaler, ctx, grad_clip):
    """One optimisation step; returns (loss, grad norm), or (loss, None) when the loss or the gradient is not
    finite (the step is skipped and the weights are untouched)."""
    with ctx:
        image_features, text_features, logit_scale = model(images, tokens)
        loss = clip_loss(gather_with_grad(image_features), gather_with_grad(text_features), logit_scale)
    if not torch.isfinite(loss):  # skip: one bad batch must not poison the weights
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), None
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's GradScaler skips such steps by itself
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP section 2.5: the temperature is clipped so the logits are scaled by at most 100
        raw_model(model).logit_scale.clamp_(0, math.log(100))
    return loss.item(), grad_norm.item()


def raw_model(model):
    return model.module if hasattr(model, "module") else model


def main(argv=None):
    try:
        args = get_args(argv)
        if args.method and args.init in (None, "scratch"):
            sys.exit(f"error: --method {args.method} adapts a pretrained CLIP: --init CKPT (e.g. out/shapes/last.pt)")
        if args.method == "aa-clip":  # anomaly adapters for zero-shot anomaly segmentation (aa_clip.py)
            from aa_clip import run as run_aa_clip
            return run_aa_clip(args)
        if args.method:  # few-shot adaptation of a pretrained CLIP (adapters.py) instead of contrastive training
            from adapters import run_method
            return run_method(args)
        run(args)
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")  # bad input: one readable line naming the file or argument, no traceback


def run(args):
    rank, world, local_rank = setup_distributed()
    master = rank == 0
    if not master:  # only rank 0 prints, logs, saves and evaluates
        sys.stdout = open(os.devnull, "w")
    device = pick_device(args.device, local_rank)
    out, ckpt_path = Path(args.out), Path(args.out) / "last.pt"
    check_resume(args, ckpt_path, world)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    model = CLIP(CLIPConfig.from_json(args.config)) if args.init == "scratch" else load_checkpoint(args.init, verbose=True)
    model.to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters ({args.init}), device {device}, "
          f"precision {args.precision}, {world} process(es)")
    loader, sampler = build_data(args, model.config.vision.image_size, model.config.text.context_length, device, rank, world)
    args.total_steps = args.max_steps or args.epochs * len(loader)
    optimizer = configure_optimizer(model, args.lr, args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    step = restore_state(ckpt_path, model, optimizer, scaler) if args.resume else 0
    ddp_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "metrics.jsonl", step)
    print(f"training: {args.total_steps} steps ({len(loader)} per epoch), global batch {args.batch_size * world}"
          + (f", resuming at step {step}" if step else ""))
    t_start = time.time()
    step = train_loop(args, model, ddp_model, loader, sampler, optimizer, scaler, step, device, master, world)
    print(f"trained {step} steps in {time.time() - t_start:.0f} s; checkpoint: {ckpt_path}")
    if master:
        finish(model, args, device, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def check_resume(args, ckpt_path, world):
    """--resume continues OUT/last.pt; without it an existing run is never overwritten."""
    if not args.resume:
        if ckpt_path.exists():
            sys.exit(f"error: {ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        return
    if not ckpt_path.exists():
        sys.exit(f"error: --resume: {ckpt_path} does not exist (run without --resume to start)")
    # a resumed run is the same run: what defines it (data, model, schedule) comes from the checkpoint.
    # To train longer with another schedule, start a new run with --init OUT/last.pt instead.
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["args"]
    for key in RUN_KEYS:
        if key in getattr(args, "typed", ()) and getattr(args, key) != saved[key]:
            print(f"warning: --resume ignores --{key.replace('_', '-')} {getattr(args, key)}: the run uses {saved[key]}")
        setattr(args, key, saved[key])
    if saved.get("world", world) != world:
        sys.exit(f"error: --resume: {ckpt_path} was trained by {saved['world']} process(es), this is {world}; "
                 "the global batch and the data order would change")


def train_loop(args, model, ddp_model, loader, sampler, optimizer, scaler, step, device, master, world):
    """Epochs of steps from `step` to args.total_steps; returns the last step. A resumed run restarts part-way
    through its epoch: the sampler skips the batches the interrupted run had already used."""
    ctx = autocast_context(device, args.precision)
    stats = {"bad_images": 0, "non_finite": 0}
    bar = tqdm(total=args.total_steps, initial=step, disable=not master, dynamic_ncols=True)
    steps_per_epoch = len(loader)  # read before set_epoch(start=...), which shortens the epoch being resumed
    while step < args.total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=(step % steps_per_epoch) * args.batch_size * world)
        model.train()
        t_data = time.time()
        for images, tokens, bad in loader:
            note_bad_images(bad, stats)
            images, tokens = equalise_batch(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True), world)
            if images.shape[0] < 2:  # (nearly) every image of the batch was unreadable: no pairs to contrast
                continue  # equalise_batch made the size equal on every process, so all of them skip together
            t_step = time.time()
            lr = get_lr(step, args.lr, args.warmup, args.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(ddp_model, images, tokens, optimizer, scaler, ctx, args.grad_clip)
            step += 1
            check_finite(loss, grad_norm, step, stats, args, model, optimizer, scaler, master)
            t_end = time.time()
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                      "grad_norm": grad_norm, "samples_per_s": images.shape[0] * world / (t_end - t_data),
                      "data_wait": (t_step - t_data) / (t_end - t_data), "bad_images": stats["bad_images"]}
            if master:
                after_step(record, args, model, optimizer, scaler, device, bar)
            if world > 1 and args.eval_every and step % args.eval_every == 0:
                dist.barrier()  # the others wait while rank 0 evaluates (no collectives inside evaluation)
            if step >= args.total_steps:
                break
            t_data = time.time()
    bar.close()
    return step


def note_bad_images(bad, stats):
    if bad:
        stats["bad_images"] += len(bad)
        tqdm.write(f"warning: skipped {len(bad)} unreadable image(s), {stats['bad_images']} so far: {bad[0]}")


def check_finite(loss, grad_norm, step, stats, args, model, optimizer, scaler, master):
    """Counts skipped non-finite steps; five in a row stop the run (the weights from before them are saved)."""
    if grad_norm is not None:
        stats["non_finite"] = 0
        return
    stats["non_finite"] += 1
    tqdm.write(f"warning: non-finite loss {loss} at step {step}: step skipped ({stats['non_finite']} in a row)")
    if stats["non_finite"] >= 5:
        ckpt_path = Path(args.out) / "last.pt"
        if master:
            save_state(ckpt_path, model, optimizer, scaler, step - 1, args)
        sys.exit(f"error: {stats['non_finite']} non-finite losses in a row: stopping (weights before them are in "
                 f"{ckpt_path}); try a lower --lr or --precision fp32/bf16")


def after_step(record, args, model, optimizer, scaler, device, bar):
    """Rank 0: log the step, update the progress bar, checkpoint and evaluate when due."""
    out, step = Path(args.out), record["step"]
    log_metrics(out, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", scale=f"{record['logit_scale']:.1f}",
                    sps=f"{record['samples_per_s']:.0f}")
    bar.update(1)
    if step % args.save_every == 0 or step == args.total_steps:
        save_state(out / "last.pt", model, optimizer, scaler, step, args)
    if args.eval_every and step % args.eval_every == 0 and args.val_split:
        log_metrics(out, {"step": step, "val": evaluate(model, args, args.val_split, device)})
        model.train()


def finish(model, args, device, out):
    """Final evaluation (validation, then the test split, read once, here) and the plot."""
    model.eval()
    for split, name in ((args.val_split, "val"), (args.test_split, "test")):
        if split:
            results = evaluate(model, args, split, device)
            log_metrics(out, {"step": "final", name: results})
            (out / f"results_{name}.json").write_text(json.dumps(results, indent=2))
    from plot import plot_metrics
    print(f"plot: {plot_metrics(out / 'metrics.jsonl', out / 'metrics.png')}")


if __name__ == "__main__":
    main()
