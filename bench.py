"""
Speed benchmarks (not tests): is our readable code also fast? Three sections, each runnable alone:

    python bench.py model      # encode_image / encode_text: model.py vs open_clip, same weights, CPU fp32
    python bench.py retrieval  # evaluate.py (batched) vs the MiniClip tutorial's one-at-a-time loop + IndexFlatL2
    python bench.py train      # one optimisation step (forward, clip_loss, backward, AdamW): model.py vs open_clip
    python bench.py all --threads 2 --repeats 7

Timing: warm-up runs first, then the median of --repeats timed runs; the two implementations alternate (which one
goes first also alternates), so a noisy neighbour slows both alike. open_clip
(https://github.com/mlfoundations/open_clip) is the reference implementation, needed only here and in the tests; the
tutorial is the MiniClip Flickr tutorial (its test_on_flickr loop and IndexFlatL2 search, rewritten in
tutorial_features / tutorial_search below).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints import load_checkpoint
from model import CLIP, CLIPConfig
from tokenizer import tokenize

ROOT = Path(__file__).resolve().parent
CAPTIONS = [f"A {size} {colour} {shape} on a plain background, photo number {i}."
            for i, (size, colour, shape) in enumerate(zip(["small", "large"] * 16,
                                                          ["red", "blue", "green", "white"] * 8,
                                                          ["circle", "star", "heart", "cross"] * 8))]  # 32 captions


def config_dict(name):
    return CLIPConfig.from_json(ROOT / "model_configs" / f"{name}.json").to_dict()


def open_clip_pair(name):
    """(ours, reference): open_clip's CLIP built from the same JSON (by the test oracles in tests/oracles.py, the only
    place that imports the reference implementations), and ours loaded from its saved state dict."""
    sys.path.insert(0, str(ROOT / "tests"))
    from oracles import openclip_model
    cfg = config_dict(name)
    try:
        reference = openclip_model(cfg, seed=0)
    except ImportError:
        raise SystemExit("this section compares against open_clip: pip install -r requirements-dev.txt")
    with tempfile.TemporaryDirectory() as tmp:  # the key names are identical, so our loader reads open_clip's file
        torch.save(reference.state_dict(), Path(tmp) / "open_clip.pt")
        ours = load_checkpoint(Path(tmp) / "open_clip.pt", config=CLIPConfig.from_dict(cfg))
    return ours, reference.eval()


def random_inputs(cfg, batch):
    g = torch.Generator().manual_seed(0)
    size, length = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    return torch.randn(batch, 3, size, size, generator=g), tokenize(CAPTIONS[:batch], length)


def time_pair(fns, repeats, warmup=2):
    """{name: median seconds} for zero-argument functions, run alternately."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, ["-" * w for w in widths]] + rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


def bench_model(args, batch=32):
    print(f"\n== model: encode_image / encode_text, CPU fp32, inference_mode, batch {batch} ==")
    rows = []
    for name in ("TinyCLIP-ViT-40M-32-Text-19M", "TinyCLIP-ViT-8M-16-Text-3M"):
        ours, ref = open_clip_pair(name)
        images, tokens = random_inputs(config_dict(name), batch)
        with torch.inference_mode():
            diff = max((ours.encode_image(images) - ref.encode_image(images)).abs().max().item(),
                       (ours.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item())
            for tower, x in (("encode_image", images), ("encode_text", tokens)):
                t = time_pair({"ours": lambda: getattr(ours, tower)(x), "open_clip": lambda: getattr(ref, tower)(x)},
                              args.repeats)
                rows.append([name, tower, f"{batch / t['ours']:.1f}", f"{batch / t['open_clip']:.1f}",
                             f"{t['open_clip'] / t['ours']:.2f}x"])
        print(f"{name}: same weights, max |ours - open_clip| = {diff:.1e}")
    print_table(["config", "call", "ours items/s", "open_clip items/s", "ours/ref speed"], rows)


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
                                  .detach().cpu().numpy()[0])
            for caption in record.captions:
                text_input = tokenize([caption], model.config.text.context_length)
                text_features.append(model.encode_text(text_input, normalize=True).detach().cpu().numpy()[0])
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


def bench_retrieval(args, subset=200):
    import synthetic
    from data import read_captions
    from evaluate import evaluate_retrieval, format_results
    json_path = synthetic.ensure_shapes()
    records, image_root = read_captions(json_path, "test"), json_path.parent / "images"
    n_images, n_captions = len(records), sum(len(r.captions) for r in records)
    print(f"\n== retrieval: shapes test, {n_images} images + {n_captions} captions, random MiniCLIP-S-64px, CPU ==")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-S-64px.json")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = evaluate_retrieval(model, records, image_root, "5cap", "shapes test", batch_size=256, workers=2,
                                     device="cpu", save_dir=tmp, progress=False)
        ours = time.perf_counter() - t0
        img, txt = np.load(Path(tmp) / "image_features.npy"), np.load(Path(tmp) / "text_features.npy")
        caption_image = np.array(json.loads((Path(tmp) / "ids.json").read_text())["caption_image"])
    print(format_results(results))
    # the tutorial's search, one query per call, run for real on all features (the saved ones: same values)
    t0 = time.perf_counter()
    hits = tutorial_search(img, txt, caption_image)
    search = time.perf_counter() - t0
    # the tutorial's encoding loop on the first `subset` images, extrapolated linearly (same cost per image + captions)
    sub = records[:subset]
    how = f"{subset} img + {sum(len(r.captions) for r in sub)} capt. x{n_images / subset:.0f} + search"
    rows = [["evaluate.py: batch 256, 2 workers, IndexFlatIP", f"{ours:.1f}", "measured", "1.0x"]]
    for grad, label in ((True, "tutorial loop, autograd on (as written)"), (False, "tutorial loop under no_grad")):
        t0 = time.perf_counter()
        tutorial_features(model, sub, image_root, grad)
        total = (time.perf_counter() - t0) * n_images / subset + search
        rows.append([label, f"{total:.1f}", how, f"{total / ours:.1f}x"])
    print_table(["method", "seconds", "how", "time / ours"], rows)
    same = all(abs(hits[d][k] - results[d][k]) < 1e-9 for d in hits for k in hits[d])
    print(f"tutorial search alone (IndexFlatL2, 1 query per call, both ways, all {n_images + n_captions} queries): "
          f"{search:.2f} s; its R@K on the same features {'equal' if same else 'DIFFER from'} ours")


def bench_train(args, batch=32):
    from train import clip_loss
    print(f"\n== train: forward + clip_loss + backward + AdamW step, CPU fp32, batch {batch} ==")
    rows = []
    for name in ("MiniCLIP-S-64px", "TinyCLIP-ViT-8M-16-Text-3M"):
        models = dict(zip(("ours", "open_clip"), open_clip_pair(name)))
        images, tokens = random_inputs(config_dict(name), batch)
        steps, losses = {}, {}
        for key, model in models.items():
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step(model=model, opt=opt, key=key):
                opt.zero_grad(set_to_none=True)
                loss = clip_loss(*model(images, tokens))  # both forwards return (image, text features, scale)
                loss.backward()
                opt.step()
                losses.setdefault(key, loss.item())  # the first step: equal weights, so equal losses
            steps[key] = step
        t = time_pair(steps, args.repeats)
        print(f"{name}: first-step loss ours {losses['ours']:.6f}, open_clip {losses['open_clip']:.6f}")
        rows.append([name, f"{batch / t['ours']:.1f}", f"{batch / t['open_clip']:.1f}",
                     f"{t['open_clip'] / t['ours']:.2f}x"])
    print_table(["config", "ours samples/s", "open_clip samples/s", "ours/ref speed"], rows)


def cpu_name():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", nargs="?", default="all", choices=["model", "retrieval", "train", "all"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores | Python {sys.version.split()[0]} "
          f"| torch {torch.__version__} "
          f"| threads {torch.get_num_threads()} | repeats {args.repeats}")
    sections = {"model": bench_model, "retrieval": bench_retrieval, "train": bench_train}
    for name, fn in sections.items():
        if args.section in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
