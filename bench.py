"""
Speed benchmarks (not tests): is our readable code also fast, and how close to this machine's peak does it run?
Eight sections, each runnable alone (python bench.py SECTION; the default is all of them, in this order):

    peak       this machine's matmul rate, 2048x2048 @ 2048x2048, in GFLOP/s for each precision (the "peak" below)
    model      encode_image / encode_text, model.py vs open_clip with the same weights under the same autocast:
               items/s of both, ours/ref speed as median [min-max] over the paired runs, the fraction of peak
               each reaches (model FLOP/s / matmul GFLOP/s at that precision), and ours bf16 vs fp32
    train      one optimisation step (forward, clip_loss, backward, AdamW): the same columns, in samples/s
    accuracy   bf16 vs fp32 on the trained default model: test-split recall at each, embeddings' min cosine,
               zero-shot probabilities' largest difference
    retrieval  the shapes test split, quiet and with one core held by another process: the MiniClip tutorial's
               one-at-a-time loop, evaluate.py with the old setting (2 workers, 2 threads) and with its automatic
               workers and threads (evaluate.encode_plan); seconds, and each one's time / the automatic one's
    compile    torch.compile, measured (not adopted anywhere): encode_image and the training step of ours,
               eager vs compiled, items/s, the speedup, each one's fraction of peak, and the compile time (the first
               call) apart; on the CPU, or on the GPU with --device cuda
    memory     peak memory of one training step against the global batch: plain, chunked (GradCache,
               train.py --accum-chunks) and with gradient checkpointing, and samples/s of each
    index      search.py's FAISS indexes (flat, ivf, hnsw) over 10k, 100k and 1M vectors of the default model's
               dimension, drawn like its image features and searched with its text features (needs the trained
               model), and random unit vectors (the hard case): build time (with the recall tuning), memory,
               one-query latency p50/p99 and recall@10 of 1,000 queries against exact search

    python bench.py all --threads 2 --repeats 7               # fp32 and bf16 where the CPU has native bf16
    python bench.py model --precision fp32 --repeats 3
    python bench.py all --device cuda                         # peak, model, train and compile on the GPU

On a GPU (--device cuda) the peak is an 8192x8192 matmul (2048 leaves most of a large GPU idle), the batches are
larger (TinyCLIP-ViT-40M-32 trains at batch 256), every timing waits for the GPU (torch.cuda.synchronize), and the
CPU-only sections (accuracy, retrieval, index, memory) are skipped.

Timing: warm-up runs first, then --repeats timed rounds; in each round every variant runs once, in an order that
reverses every round (ABBA...), so a noisy neighbour slows all alike, and a ratio is taken within each round. A
median of them is reported, with [min-max]. FLOPs are counted from the configs (clip_flops: the matrix products,
2 per multiply-add; a training step is 3x the forward), for the captions' real length: ours skips the padding
after the last EOT, open_clip computes it, so open_clip's fraction of peak on text shows that waste.
open_clip (https://github.com/mlfoundations/open_clip) is the reference implementation, needed only here and in the
tests; the tutorial is the MiniClip Flickr tutorial (its test_on_flickr loop and IndexFlatL2 search, rewritten in
tutorial_features / tutorial_search below).
"""
import argparse
import copy
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from checkpoints import load_checkpoint
from model import CLIP, CLIPConfig
from runtime import PRECISIONS, autocast_context, cpu_has_bf16, error_line, int_at_least, resolve_precision
from tokenizer import tokenize

ROOT = Path(__file__).resolve().parent
CAPTIONS = [f"A {size} {colour} {shape} on a plain background, photo number {i}."
            for i, (size, colour, shape) in enumerate(zip(["small", "large"] * 16,
                                                          ["red", "blue", "green", "white"] * 8,
                                                          ["circle", "star", "heart", "cross"] * 8))]  # 32 captions
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_40M, TINY_8M = "TinyCLIP-ViT-40M-32-Text-19M", "TinyCLIP-ViT-8M-16-Text-3M"
MODEL_RUNS = {"cpu": [(TINY_40M, 32), (TINY_8M, 32)],  # device -> [(config, batch)]
              "cuda": [(TINY_40M, 256), (TINY_8M, 256)]}
TRAIN_RUNS = {"cpu": [("MiniCLIP-S-64px", 32), ("MiniCLIP-S-64px", 128), (TINY_8M, 32)],
              "cuda": [("MiniCLIP-S-64px", 128), (TINY_8M, 256), (TINY_40M, 256)]}
COMPILE_RUNS = {"cpu": [("MiniCLIP-S-64px", "encode_image", 256), (TINY_40M, "encode_image", 32),  # (config, what,
                        ("MiniCLIP-S-64px", "train step", 128)],                                  # batch)
                "cuda": [(TINY_40M, "encode_image", 256), ("MiniCLIP-S-64px", "train step", 128),
                         (TINY_40M, "train step", 256)]}


def config_dict(name):
    return CLIPConfig.from_json(ROOT / "model_configs" / f"{name}.json").to_dict()


def open_clip_pair(name):
    """(ours, reference): open_clip's CLIP built from the same JSON (by the test oracles in tests/oracles.py, the only
    place that imports the reference implementations), and ours loaded from its saved state dict."""
    sys.path.insert(0, str(ROOT / "tests"))
    from oracles import openclip_model
    cfg = config_dict(name)
    if cfg["vision_cfg"].pop("stem_channels"):  # open_clip's ViT has no convolutional stem: compare both without it
        print(f"note: {name} is compared without its conv stem (open_clip's ViT has none): the same patchify model")
    try:
        reference = openclip_model(cfg, seed=0)
    except ImportError:
        raise SystemExit("this section compares against open_clip: pip install -r requirements-dev.txt")
    with tempfile.TemporaryDirectory() as tmp:  # the key names are identical, so our loader reads open_clip's file
        torch.save(reference.state_dict(), Path(tmp) / "open_clip.pt")
        ours = load_checkpoint(Path(tmp) / "open_clip.pt", config=CLIPConfig.from_dict(cfg))
    return ours, reference.eval()


def random_inputs(cfg, batch):
    """batch random images and batch captions (CAPTIONS repeated as needed), tokenized to the context length."""
    g = torch.Generator().manual_seed(0)
    size, length = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    return torch.randn(batch, 3, size, size, generator=g), tokenize([CAPTIONS[i % 32] for i in range(batch)], length)


def caption_length(tokens):
    """Positions up to the last EOT: what encode_text computes (the padding after it cannot change the result)."""
    return int(tokens.argmax(dim=-1).max()) + 1

# -----------------------------------------------------------------------------
# Counting: FLOPs from a config, the machine's matmul rate, timing in alternating rounds


def transformer_flops(width, layers, length, mlp_ratio=4.0):
    """FLOPs (2 per multiply-add) of `layers` Transformer blocks on L = `length` tokens of D = `width`: the q/k/v
    and output projections 2*L*D*3D + 2*L*D*D, the attention scores q k^T and the weighted sum of v, 2*L^2*D each,
    and the MLP 2 * 2*L*D*(mlp_ratio*D). LayerNorm, softmax, GELU and the adds are left out (a few %)."""
    hidden = int(width * mlp_ratio)
    projections = 2 * length * width * 4 * width
    attention = 2 * (2 * length * length * width)
    mlp = 2 * (2 * length * width * hidden)
    return layers * (projections + attention + mlp)


def clip_flops(cfg, image=True, text=True, text_length=None):
    """Forward FLOPs of one image and/or one caption through CLIP (a CLIPConfig): the convolutional stem, if any,
    the patch embedding (a stride-p convolution: 2 * patches * 3p^2 * D without a stem), the Transformer
    (transformer_flops, class token included) and the final projection; the text tower at text_length tokens
    (default: its context length). A training step is ~3x this (the backward pass computes two products for each
    one of the forward)."""
    flops = 0
    if image:
        v = cfg.vision
        side, channels = v.image_size, 3
        for c in v.stem_channels:  # each 3x3 stride-2 convolution of the stem: 2 * outputs * 9 * C_in * C_out
            side //= 2
            flops += 2 * side * side * 9 * channels * c
            channels = c
        p = v.patch_size // 2 ** len(v.stem_channels)  # the patch projection's kernel (1 after a full stem)
        patches = (v.image_size // v.patch_size) ** 2
        flops += 2 * patches * channels * p ** 2 * v.width  # patch embedding
        flops += transformer_flops(v.width, v.layers, patches + 1, v.mlp_ratio)
        flops += 2 * v.width * cfg.embed_dim  # the class token's projection
    if text:
        t = cfg.text
        flops += transformer_flops(t.width, t.layers, text_length or t.context_length, t.mlp_ratio)
        flops += 2 * t.width * cfg.embed_dim  # the EOT token's projection
    return flops


def step_flops(cfg, tokens):
    """FLOPs of one training step per (image, caption) pair: 3x the forward (clip_flops) at the captions' length."""
    return 3 * clip_flops(cfg, text_length=caption_length(tokens))


_PEAK = {}  # (device, precision) -> GFLOP/s, measured once per run


def peak_size(device):
    """The side n of the peak's matmul: 2048 on the CPU; 8192 on a GPU, where 2048 leaves most of it idle."""
    return 8192 if torch.device(device).type == "cuda" else 2048


def synchronizer(device):
    """A function that waits until `device` has finished its queued work: a GPU runs kernels asynchronously, so a
    timer stopped without it measures only the launches. Nothing to wait for on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def matmul_gflops(precision, device="cpu", repeats=5):
    """This machine's rate for one large matmul (n x n @ n x n, 2 n^3 FLOPs; n 2048 on the CPU, 8192 on a GPU) in
    that dtype, median of `repeats`: the "peak" that fraction of peak divides by (it includes torch's thread
    setting)."""
    if (device, precision) not in _PEAK:
        n, sync = peak_size(device), synchronizer(device)
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(device, DTYPES[precision]) for _ in range(2))
        times = time_pair({"matmul": lambda: a @ b}, max(3, repeats), sync=sync)["matmul"]
        _PEAK[device, precision] = 2 * n ** 3 / statistics.median(times) / 1e9
    return _PEAK[device, precision]


def time_pair(fns, repeats, warmup=2, sync=lambda: None):
    """{name: [seconds of each round]} for zero-argument functions: warm-up calls, then `repeats` rounds in which
    each function runs once, first to last in even rounds and last to first in odd ones (ABBA...). sync: waits for
    the device (synchronizer) before a timer starts and stops."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(slow, fast):
    """Per-round ratios slow[i] / fast[i] (speed of `fast` relative to `slow`) as 'median x [min-max]'."""
    r = [s / f for s, f in zip(slow, fast)]
    return f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]"


def peak_rates(args):
    """{precision: this machine's matmul GFLOP/s} for the precisions of this run."""
    return {p: matmul_gflops(p, args.device, args.repeats) for p in args.precisions}


def print_peaks(args):
    print(f"% peak: model FLOP/s / the {args.device} matmul rate at that precision (" +
          ", ".join(f"{p} {gflops:.0f} GFLOP/s" for p, gflops in peak_rates(args).items()) + "; bench.py peak)")


def print_table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths]] + rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


SPEED_HEADERS = ["config", "call", "batch", "prec", "ours /s", "open_clip /s", "ours/ref speed", "ours % peak",
                 "ref % peak", "ours bf16/fp32"]


def speed_rows(name, call, batch, flops, times, peaks):
    """One table row per precision from time_pair's {(precision, "ours"|"open_clip"): [seconds]}; flops: the work
    of one call; peaks: {precision: matmul GFLOP/s}, for the fraction of peak."""
    rows = []
    for p in peaks:
        ours, ref = times[p, "ours"], times[p, "open_clip"]
        peak = peaks[p] * 1e9
        vs_fp32 = ratio(times["fp32", "ours"], ours) if p != "fp32" and "fp32" in peaks else "-"
        rows.append([name, call, batch, p, f"{batch / statistics.median(ours):.1f}",
                     f"{batch / statistics.median(ref):.1f}", ratio(ref, ours),
                     f"{flops / statistics.median(ours) / peak:.1%}", f"{flops / statistics.median(ref) / peak:.1%}",
                     vs_fp32])
    return rows

# -----------------------------------------------------------------------------
# Sections


def bench_peak(args):
    n = peak_size(args.device)
    print(f"\n== peak: one {n}x{n} @ {n}x{n} matmul on the {args.device}, median of {max(3, args.repeats)} ==")
    rates = peak_rates(args)
    for p, gflops in rates.items():
        vs = f"  ({gflops / rates['fp32']:.1f}x fp32)" if p != "fp32" and "fp32" in rates else ""
        print(f"{p:5s} {gflops:8.1f} GFLOP/s{vs}")


def max_diff(ours, ref, images, tokens, precision, device="cpu"):
    """Largest |ours - open_clip| over both towers' outputs under `precision`'s autocast."""
    with torch.inference_mode(), autocast_context(device, precision):
        return max((ours.encode_image(images) - ref.encode_image(images)).abs().max().item(),
                   (ours.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item())


def run_under(precision, fn, x, device="cpu"):
    """fn(x) under inference_mode and the precision's autocast."""
    with torch.inference_mode(), autocast_context(device, precision):
        return fn(x)


def bench_model(args):
    print(f"\n== model: encode_image / encode_text, model.py vs open_clip under the same autocast, {args.device}, "
          "inference_mode ==")
    rows, device = [], args.device
    for name, batch in MODEL_RUNS[device]:
        ours, ref = (m.to(device) for m in open_clip_pair(name))
        cfg = ours.config  # what both run (no conv stem)
        images, tokens = (x.to(device) for x in random_inputs(config_dict(name), batch))
        flops = {"encode_image": batch * clip_flops(cfg, text=False),
                 "encode_text": batch * clip_flops(cfg, image=False, text_length=caption_length(tokens))}
        for call, x in (("encode_image", images), ("encode_text", tokens)):
            fns = {(p, key): lambda m=m, p=p: run_under(p, getattr(m, call), x, device)
                   for p in args.precisions for key, m in (("ours", ours), ("open_clip", ref))}
            times = time_pair(fns, args.repeats, sync=synchronizer(device))
            rows += speed_rows(name, call, batch, flops[call], times, peak_rates(args))
        diffs = ", ".join(f"{p} {max_diff(ours, ref, images, tokens, p, device):.1e}" for p in args.precisions)
        print(f"{name}: same weights, max |ours - open_clip|: {diffs}")
    print_table(SPEED_HEADERS, rows)
    print_peaks(args)


def make_train_step(model, opt, images, tokens, precision, device="cpu"):
    """A function doing one optimisation step as train.py does: the towers under autocast, clip_loss in fp32,
    backward, AdamW. It returns the loss."""
    from losses import clip_loss

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            image_features, text_features, scale = model(images, tokens)  # both models return these three
        loss = clip_loss(image_features.float(), text_features.float(), scale.float())
        loss.backward()
        opt.step()
        return loss.item()
    return step


def bench_train(args):
    print(f"\n== train: forward + clip_loss + backward + AdamW step, model.py vs open_clip, {args.device} ==")
    rows, device = [], args.device
    for name, batch in TRAIN_RUNS[device]:
        pair = [m.to(device) for m in open_clip_pair(name)]
        cfg = pair[0].config  # what both run (no conv stem)
        images, tokens = (x.to(device) for x in random_inputs(config_dict(name), batch))
        fns, first = {}, {}  # first: each function's first loss (ours and open_clip have had the same steps before)
        for key, model in zip(("ours", "open_clip"), pair):
            opt = torch.optim.AdamW(model.train().parameters(), lr=1e-5)  # one per model, for all precisions
            for p in args.precisions:
                step = make_train_step(model, opt, images, tokens, p, device)
                fns[p, key] = lambda step=step, k=(p, key): first.setdefault(k, step())
        times = time_pair(fns, args.repeats, sync=synchronizer(device))
        flops = batch * step_flops(cfg, tokens)
        rows += speed_rows(name, "train step", batch, flops, times, peak_rates(args))
        print(f"{name} batch {batch}: first loss ours / open_clip: " +
              ", ".join(f"{p} {first[p, 'ours']:.5f} / {first[p, 'open_clip']:.5f}" for p in args.precisions))
    print_table(SPEED_HEADERS, rows)
    print_peaks(args)


def tutorial_features(model, records, image_root, grad):
    """The tutorial's test_on_flickr loop, for all captions: one image and one caption at a time. grad=True keeps
    its missing torch.no_grad (autograd records every forward pass); grad=False isolates the cost of batch size 1."""
    from PIL import Image
    from transform import image_transform
    image_features, text_features = [], []
    with torch.set_grad_enabled(grad):
        for record in records:
            image = Image.open(Path(image_root) / record.image).convert("RGB")
            # rebuilt per image, as there
            val_processor = image_transform(model.config.vision.image_size, is_train=False)
            image_features.append(model.encode_image(val_processor(image).unsqueeze(0), normalize=True)
                                  .detach().float().cpu().numpy()[0])  # .float(): numpy has no bf16
            for caption in record.captions:
                text_input = tokenize([caption], model.config.text.context_length)
                text_features.append(model.encode_text(text_input, normalize=True).detach().float().cpu().numpy()[0])
    return np.stack(image_features), np.stack(text_features)


def tutorial_search(image_features, text_features, caption_image, k=10):
    """IndexFlatL2, one query at a time, both directions (the tutorial searches text -> image only)."""
    import faiss
    hits = {}
    for direction, (queries, database, label_q, label_db) in {
            "text_to_image": (text_features, image_features, caption_image, np.arange(len(image_features))),
            "image_to_text": (image_features, text_features, np.arange(len(image_features)), caption_image)}.items():
        index = faiss.IndexFlatL2(database.shape[1])
        index.add(database)
        found = [label_db[index.search(np.array([q]), k)[1][0]] for q in queries]
        hits[direction] = {f"R@{n}": float(np.mean([label in f[:n] for label, f in zip(label_q, found)]))
                           for n in (1, 5, 10)}
    return hits


def timed(fn):
    """(seconds, result) of fn()."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@contextmanager
def busy_core():
    """Another process spinning on one core (a tight Python loop) for the duration of the block, then killed."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started, and holding its core
        yield
    finally:
        spinner.kill()
        spinner.wait()


def bench_retrieval(args, subset=200):
    import synthetic
    from data import CaptionEvalDataset, read_captions
    from evaluate import encode_plan, evaluate_retrieval, free_cores
    from transform import image_transform
    json_path = synthetic.ensure_shapes()
    records, image_root = read_captions(json_path, "test")[:args.eval_images], json_path.parent / "images"
    n_images, n_captions = len(records), sum(len(r.captions) for r in records)
    print(f"\n== retrieval: shapes test, {n_images} images + {n_captions} captions, random MiniCLIP-S-64px, CPU ==")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-S-64px.json")).eval()
    evaluate_retrieval(model, records[:16], image_root, workers=0, device="cpu", progress=False)  # warm-up
    dataset = CaptionEvalDataset(records, image_root, image_transform(model.config.vision.image_size))
    rows, same = [], {}
    for case, context in (("quiet", nullcontext()), ("busy", busy_core())):
        with context:
            workers, threads = encode_plan(None, None, dataset, "cpu")
            free = free_cores()
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            note = " (not quiet: other processes are running)" if case == "quiet" and free < cores else ""
            print(f"{case}: {free} free core(s) of {cores}{note}; evaluate.py's automatic choice: {workers} workers, "
                  f"{threads} thread(s)")
            for p in args.precisions:
                case_rows, same[case, p] = retrieval_case(model, records, image_root, p, min(subset, n_images))
                rows += [[case, p] + row for row in case_rows]
    print_table(["machine", "prec", "method", "seconds", "how", "time / auto"], rows)
    print("busy: another process spins on one core meanwhile (busy_core). The tutorial's search (IndexFlatL2, one "
          f"query per call, both ways, {n_images + n_captions} queries) on the same features gives our R@K: "
          + ", ".join(f"{case} {p} {'yes' if ok else 'NO'}" for (case, p), ok in same.items()))


def retrieval_case(model, records, image_root, precision, subset):
    """Rows [method, seconds, how, time / the automatic setting's] at one precision, and whether the tutorial's
    search gives our R@K on the same features. The tutorial loop runs on `subset` images, extrapolated linearly."""
    from evaluate import evaluate_retrieval
    settings = {"evaluate.py, automatic workers and threads": dict(workers=None, threads=None),
                "evaluate.py, 2 workers, 2 threads (old)": dict(workers=2, threads=2)}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in settings.items():
            seconds[label], results = timed(lambda: evaluate_retrieval(
                model, records, image_root, "5cap", "test", batch_size=256, device="cpu", save_dir=tmp,
                progress=False, precision=precision, **kw))
        img, txt = np.load(Path(tmp) / "image_features.npy"), np.load(Path(tmp) / "text_features.npy")
        caption_image = np.array(json.loads((Path(tmp) / "ids.json").read_text())["caption_image"])
    search, hits = timed(lambda: tutorial_search(img, txt, caption_image))
    sub = records[:subset]
    how = f"{subset} img + {sum(len(r.captions) for r in sub)} capt. x{len(records) / subset:g} + search"
    for grad, label in ((True, "tutorial loop, autograd on (as written)"), (False, "tutorial loop under no_grad")):
        with autocast_context("cpu", precision):
            t, _ = timed(lambda: tutorial_features(model, sub, image_root, grad))
        seconds[label] = t * len(records) / subset + search
    auto = seconds["evaluate.py, automatic workers and threads"]
    rows = [[label, f"{t:.1f}", "measured" if label in settings else how, f"{t / auto:.1f}x"]
            for label, t in seconds.items()]
    return rows, all(abs(hits[d][k] - results[d][k]) < 1e-9 for d in hits for k in hits[d])


def compile_problem():
    """None when torch.compile works here (a tiny function compiles and runs), else one line saying why."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(8))
    except Exception as e:  # no C compiler, an unsupported Python, ...: whatever it is, say it in one line
        return f"{type(e).__name__}: {error_line(e)[:200]}"
    return None


def compile_pair(name, what, batch, precision, device):
    """(eager, compiled) zero-argument functions running `what` ("encode_image" or "train step") of ours with
    fresh random weights; the compiled one compiles on its first call."""
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_dict(config_dict(name))).to(device)
    images, tokens = (x.to(device) for x in random_inputs(config_dict(name), batch))
    sync = synchronizer(device)
    if what == "encode_image":
        fns = (model.eval().encode_image, torch.compile(model.encode_image))
        return [lambda fn=fn: (run_under(precision, fn, images, device), sync()) for fn in fns]
    pair = []
    for m in (model, torch.compile(copy.deepcopy(model))):  # each its own weights and optimizer
        step = make_train_step(m.train(), torch.optim.AdamW(m.parameters(), lr=1e-5), images, tokens, precision,
                               device)
        pair.append(lambda step=step: (step(), sync()))
    return pair


def bench_compile(args):
    print("\n== compile: torch.compile (inductor) vs eager, model.py, fresh random weights ==")
    seconds, problem = timed(compile_problem)
    if problem:
        print(f"torch.compile does not work here, section skipped: {problem}")
        return
    print(f"torch.compile works: a tiny function took {seconds:.0f} s (mostly inductor's one-time start-up)")
    # the text tower's int(eot.max()) (dropping the padding) is a graph break by design: dynamo's warning about it,
    # repeated for every config, would bury the table
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    rows, device, peaks = [], args.device, peak_rates(args)
    for p in args.precisions:
        for name, what, batch in COMPILE_RUNS[device]:
            eager, compiled = compile_pair(name, what, batch, p, device)
            try:
                first, _ = timed(compiled)  # compiles, then runs once
            except Exception as e:
                print(f"{device} {name} {what} {p}: torch.compile failed: {type(e).__name__}: {error_line(e)[:200]}")
                continue
            times = time_pair({"eager": eager, "compiled": compiled}, args.repeats, warmup=1)  # they wait for the GPU
            cfg, (_, tokens) = CLIPConfig.from_dict(config_dict(name)), random_inputs(config_dict(name), batch)
            flops = batch * (clip_flops(cfg, text=False) if what == "encode_image" else step_flops(cfg, tokens))
            eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
            rows.append([name, what, batch, p, f"{batch / eager_s:.1f}", f"{batch / compiled_s:.1f}",
                         ratio(times["eager"], times["compiled"]), f"{flops / eager_s / peaks[p] / 1e9:.1%}",
                         f"{flops / compiled_s / peaks[p] / 1e9:.1%}", f"{first - compiled_s:.1f}"])
    print(f"device: {device}")
    print_table(["config", "call", "batch", "prec", "eager items/s", "compiled items/s", "speedup", "eager % peak",
                 "compiled % peak", "compile s"], rows)
    print_peaks(args)


def trained_checkpoint(args, what):
    """--checkpoint, or the default run's out/shapes/last.pt; None, with a line saying `what` is skipped and why,
    when it is missing."""
    path = Path(args.checkpoint or ROOT / "out" / "shapes" / "last.pt")
    if path.exists():
        return path
    print(f"{what} skipped: {path} not found (python train.py first, or --checkpoint CKPT)")


def shapes_split(model, split):
    """The built-in Shapes images and captions of one split (None: all of them), at the model's image size."""
    from data import CaptionEvalDataset, read_captions
    from synthetic import ensure_shapes
    from transform import image_transform
    data = ensure_shapes()
    return CaptionEvalDataset(read_captions(data, split), data.parent / "images",
                              image_transform(model.config.vision.image_size))


def bench_accuracy(args):
    """bf16 against fp32 on a trained model (--checkpoint, default: the default run) and the built-in test split:
    retrieval R@1/5/10 both ways at each precision, the smallest cosine between a bf16 embedding and its fp32 one,
    and the largest difference of a zero-shot probability (each image against the first caption of every image)."""
    print("\n== accuracy: bf16 vs fp32 on the trained model and the built-in test split ==")
    path = trained_checkpoint(args, "accuracy")
    if path is None:
        return
    print(f"checkpoint: {path}")
    from evaluate import encode_images, encode_texts, recall_at_k
    model = load_checkpoint(path).eval()
    dataset = shapes_split(model, "test")
    first = [dataset.caption_image.tolist().index(i) for i in range(len(dataset))]  # each image's first caption
    rows, features = [], {}
    for precision in ("fp32", "bf16"):
        images = encode_images(model, dataset, precision=precision, progress=False)  # (N, D) float32, normalised
        texts = encode_texts(model, dataset.captions, precision=precision, progress=False)  # (5N, D)
        logits = model.logit_scale.exp().item() * torch.from_numpy(images @ texts[first].T)  # (N, N), in fp32
        features[precision] = images, texts, logits.softmax(dim=-1)
        r = recall_at_k(images, texts, dataset.caption_image.numpy())
        rows.append([precision] + [f"{100 * r[d][f'R@{k}']:.2f}" for d in ("text_to_image", "image_to_text")
                                   for k in (1, 5, 10)])
    print_table(["precision", "T->I R@1", "R@5", "R@10", "I->T R@1", "R@5", "R@10"], rows)
    (i32, t32, p32), (i16, t16, p16) = features["fp32"], features["bf16"]
    print(f"min cosine bf16 vs fp32: images {(i32 * i16).sum(axis=1).min():.5f}, captions "
          f"{(t32 * t16).sum(axis=1).min():.5f}; zero-shot probabilities ({len(first)}-way): max |bf16 - fp32| "
          f"{(p32 - p16).abs().max().item():.2e}")


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # (n, d)


def random_rows(n, d, seed):
    return unit_rows(np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32))  # (n, d)


def feature_rows(model, n_queries=1000):
    """The trained model's own features, for the index benchmark -> (queries, images, draw). queries: its text
    features of n_queries test captions; images: its features of the 12,000 built-in images; draw(n, seed): n unit
    vectors from a Gaussian with the mean and covariance of those image features. The Gaussian keeps how unevenly
    the features spread over directions and where images sit against texts (the modality gap), but not their
    clusters, which make search easier: compare its rows with the images' own at 10,000."""
    from evaluate import encode_images, encode_texts
    test = shapes_split(model, "test")
    rng = np.random.default_rng(1)
    queries = encode_texts(model, [test.captions[i] for i in rng.choice(len(test.captions), n_queries,
                                                                        replace=False)], progress=False)  # (Q, D)
    images = encode_images(model, shapes_split(model, None), progress=False)  # (N, D) unit rows
    return queries, images, fitted_gaussian(images)


def fitted_gaussian(x):
    """draw(n, seed): n unit vectors drawn from a Gaussian with the mean and covariance of the rows of x (N, D)."""
    mean, cov = x.mean(axis=0, dtype=np.float64), np.cov(x, rowvar=False)  # (D,), (D, D)

    def draw(n, seed):
        return unit_rows(np.random.default_rng(seed).multivariate_normal(mean, cov, size=n, method="cholesky"))
    return draw


def index_case(x, queries, kind):
    """search.build_index over x, then each query alone: (build s, MB, p50 ms, p99 ms, recall@10, info)."""
    import faiss
    from search import build_index
    start = time.perf_counter()
    index, info = build_index(x, kind)
    build = time.perf_counter() - start
    megabytes = len(faiss.serialize_index(index)) / 2 ** 20
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(queries, 10)  # (Q, 10)
    latency, hits = [], []
    for q, want in zip(queries, truth):
        start = time.perf_counter()
        _, found = index.search(q[None], 10)  # one query at a time, as the search page asks
        latency.append(1000 * (time.perf_counter() - start))
        hits.append(len(set(found[0]) & set(want)) / 10)
    p50, p99 = np.percentile(latency, [50, 99])
    return build, megabytes, p50, p99, float(np.mean(hits)), info


def index_cases(vectors, sizes, checkpoint, d):
    """(queries, cases) for one kind of --index-vectors; cases yields (name, x) one at a time (a million rows is
    512 MB). random: isotropic unit vectors, no clusters and every direction alike, the hard case for an
    approximate index. features: see feature_rows; the 12,000 real image features come first, then the Gaussian's."""
    if vectors == "random":
        return random_rows(1000, d, seed=1), ((vectors, random_rows(n, d, seed=0)) for n in sizes)
    queries, images, draw = feature_rows(load_checkpoint(checkpoint).eval())
    return queries, itertools.chain([("images", images)], ((vectors, draw(n, seed=0)) for n in sizes))


def bench_index(args):
    """search.build_index's FAISS indexes (flat, ivf, hnsw) at each of --index-sizes, for each of --index-vectors."""
    d = CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-S-64px.json").embed_dim
    rows = []
    for vectors in args.index_vectors:
        checkpoint = trained_checkpoint(args, "index: features") if vectors == "features" else None
        if vectors == "features" and checkpoint is None:
            continue
        queries, cases = index_cases(vectors, args.index_sizes, checkpoint, d)
        for name, x in cases:
            for kind in ("flat", "ivf", "hnsw"):
                build, mb, p50, p99, recall, info = index_case(x, queries, kind)
                params = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("type", "recall@10"))
                rows.append([name, f"{len(x):,}", kind, params or "-", f"{build:.1f}", f"{mb:.0f}", f"{p50:.2f}",
                             f"{p99:.2f}", f"{recall:.3f}"])
                print(" | ".join(rows[-1]), flush=True)
    print(f"index ({d}-d unit vectors; build includes the recall tuning; latency: one query at a time)")
    print_table(["vectors", "n", "index", "parameters", "build s", "MB", "p50 ms", "p99 ms", "recall@10"], rows)


def memory_case(mode, batch, chunks, precision, threads, steps=3):
    """In a fresh process (multiprocessing spawn, so no case inherits another's freed memory): the default model,
    one warm-up step at batch 2 (it creates AdamW's state), then `steps` train.train_step calls at `batch` with 3
    hard negatives per caption and the shape label prompts, as the default training run. Returns (step MB: the peak
    resident memory of those steps above the memory before them, read from /proc/self/status VmHWM after resetting
    it; samples/s of the median step)."""
    from label_prompts import LabelPrompts
    from train import configure_optimizer, train_step
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-S-64px.json")).train()
    model.set_grad_checkpointing(mode.endswith("checkpointed"))
    opt = configure_optimizer(model, 1e-4, 0.1)
    scaler, ctx = torch.amp.GradScaler("cpu", enabled=False), autocast_context("cpu", precision)

    def inputs(n):
        captions = [CAPTIONS[(i + j) % len(CAPTIONS)] for i in range(n) for j in range(4)]  # caption + 3 negatives
        images = torch.randn(n, 3, model.visual.image_size, model.visual.image_size)
        return images, tokenize(captions, model.config.text.context_length).view(n, 4, -1)  # (n, 1 + 3, L)
    prompts = LabelPrompts("shape", model.config.text.context_length)  # as the default run: 8 more captions a step
    train_step(model, *inputs(2), opt, scaler, ctx, 1.0, 2.0, prompts=prompts)
    images, tokens = inputs(batch)

    def status(key):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024  # kB -> MB
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident memory, to the current one
    before, seconds = status("VmRSS"), []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, images, tokens, opt, scaler, ctx, 1.0, 2.0, chunks=chunks, prompts=prompts)
        seconds.append(time.perf_counter() - start)
    return status("VmHWM") - before, batch / statistics.median(seconds)


def bench_memory(args):
    """Peak memory of a training step against the global batch: plain, chunked (GradCache, --accum-chunks: chunks
    of the plain run's batch) and with gradient checkpointing, on the default model, one process per case."""
    import multiprocessing
    precision = args.precisions[-1]
    print(f"\n== memory: one training step of the default model (3 hard negatives), CPU, {precision} ==")
    threads, spawn, rows = args.threads or torch.get_num_threads(), multiprocessing.get_context("spawn"), []
    base = args.memory_batch
    cases = [("plain", b, 1) for b in (base // 2, base, 2 * base, 4 * base)]
    cases += [("checkpointed", b, 1) for b in (base, 4 * base)]
    cases += [("chunked", 4 * base, 4)] + [("chunked", 16 * base, k) for k in (16, 32, 64, 128)]
    cases += [("chunked + checkpointed", 16 * base, k) for k in (16, 32)]
    for mode, batch, chunks in cases:
        with spawn.Pool(1) as pool:
            megabytes, rate = pool.apply(memory_case, (mode, batch, chunks, precision, threads))
        rows.append([mode, batch, chunks, megabytes, rate])
        print(f"{mode}, batch {batch}, {chunks} chunk(s): {megabytes:.0f} MB, {rate:.0f} samples/s", flush=True)
    plain = next(r for r in rows if r[:2] == ["plain", base])
    print_table(["mode", "global batch", "chunks", "step MB", f"MB / plain {base}'s", "samples/s",
                 f"samples/s / plain {base}'s"],
                [[mode, str(batch), str(chunks), f"{mb:.0f}", f"{mb / plain[3]:.2f}", f"{rate:.0f}",
                  f"{rate / plain[4]:.2f}"] for mode, batch, chunks, mb, rate in rows])


def precisions_for(device, requested):
    """The precisions to run: the one asked for, else fp32 and bf16 where the device has native bf16, else fp32."""
    if requested is not None:
        return [resolve_precision(device, requested)[0]]
    return ["fp32", "bf16"] if resolve_precision(device)[0] == "bf16" else ["fp32"]


def cpu_name():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


SECTIONS = {"peak": bench_peak, "model": bench_model, "train": bench_train, "accuracy": bench_accuracy,
            "retrieval": bench_retrieval, "compile": bench_compile, "index": bench_index,
            "memory": bench_memory}
GPU_SECTIONS = ("peak", "model", "train", "compile")  # the others measure this CPU's cores (busy_core, VmHWM, FAISS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", nargs="?", default="all", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int_at_least(1), default=5, help="timed rounds per measurement")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default: fp32 and bf16 where the CPU has native bf16 (runtime.cpu_has_bf16), else fp32")
    p.add_argument("--eval-images", type=int_at_least(1), help="retrieval: the first N test images (default: all)")
    p.add_argument("--checkpoint", help="accuracy, index: the trained model (default: out/shapes/last.pt)")
    p.add_argument("--index-sizes", type=int_at_least(20), nargs="+", default=[10_000, 100_000, 1_000_000],
                   help="index: the numbers of vectors")
    p.add_argument("--index-vectors", choices=["features", "random"], nargs="+", default=["features", "random"],
                   help="index: features (like the trained model's, --checkpoint) and/or random unit vectors")
    p.add_argument("--memory-batch", type=int_at_least(2), default=128,
                   help="memory: the plain run's batch that the other cases are compared with")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help=f"cuda: run {', '.join(GPU_SECTIONS)} on the GPU (the other sections are CPU-only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and args.section not in (*GPU_SECTIONS, "all"):
        p.error(f"--device cuda: the {args.section} section measures the CPU; run it with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    if args.precision == "fp16" and args.device == "cpu":
        p.error("--precision fp16 needs a GPU (CPU LayerNorm has no fp16 kernel); use bf16 or fp32")
    args.precisions = precisions_for(args.device, args.precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = f"GPU {torch.cuda.get_device_name()} | " if args.device == "cuda" else ""
    print(f"machine: {gpu}{cpu_name()}, {os.cpu_count()} cores, native bf16 {'yes' if cpu_has_bf16() else 'no'} "
          f"| Python {sys.version.split()[0]} | torch {torch.__version__} | threads {torch.get_num_threads()} "
          f"| repeats {args.repeats} | precisions {', '.join(args.precisions)}")
    for name, fn in SECTIONS.items():
        if args.section in (name, "all") and (args.device == "cpu" or name in GPU_SECTIONS):
            fn(args)


if __name__ == "__main__":
    main()
