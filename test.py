r"""
Evaluations of a trained or released CLIP (CLIP paper section 3: zero-shot transfer and retrieval).

    python test.py                       # the default run (python train.py): zero-shot demo + test-split retrieval
    python test.py --checkpoint out/mine/last.pt   # the same for a run trained with --out out/mine
    python test.py zeroshot --checkpoint model_hub/TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt \
        --image dog.jpg --text "a dog" "a cat" "a fish" "a pig"
    python test.py retrieval --checkpoint CKPT --data dataset_flickr30k.json --images flickr30k-images \
        [--split test] [--protocol 5cap|1cap] [--json results.json]
    python test.py anomaly --checkpoint out/aa-clip/aa_clip.pt [--data MVTEC_OR_VISA_ROOT] [--categories ...]
    python test.py anomaly --checkpoint out/shapes/last.pt     # any CLIP checkpoint: the un-adapted baseline
    python test.py probe [--checkpoint CKPT] [--json PATH] [--n N] [--precision auto|fp32|bf16|fp16]
                                         # zero-shot probe suite (probe.py): shape, colour, ..., binding, relation
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoints import CheckpointError, load_checkpoint
from tokenizer import tokenize
from runtime import (autocast_context, error_line, int_at_least, pick_device, plain_warnings, precision_line,
                     PRECISIONS, resolve_precision)
from transform import ImageLoadError, image_transform, load_image

ROOT = Path(__file__).resolve().parent
MODEL_HUB = ROOT / "model_hub"
DEFAULT_RUN = ROOT / "out" / "shapes" / "last.pt"
TINYCLIP_URL = "https://github.com/wkcn/TinyCLIP-model-zoo/releases/download/checkpoints/"


def find_tinyclip():
    """The first TinyCLIP checkpoint (file or Hugging Face directory) under model_hub/."""
    found = sorted(MODEL_HUB.glob("TinyCLIP*")) + sorted(MODEL_HUB.glob("*/TinyCLIP*"))
    if not found:
        sys.exit(f"error: no --checkpoint given and no TinyCLIP checkpoint in {MODEL_HUB}/.\n"
                 f"Download one (e.g. {TINYCLIP_URL}TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt) into {MODEL_HUB}/, "
                 "or pass --checkpoint PATH.")
    return found[0]


@torch.no_grad()
def zero_shot(model, images, texts, precision="fp32"):
    """Cosine similarity of each image with each text, and the softmax over texts of logit_scale * cosine
    (CLIP's zero-shot classifier, section 3.1.2). Returns two (n_images, n_texts) tensors. The towers run at
    `precision` (runtime.autocast_context); the cosines and the softmax are computed in fp32."""
    if not images or not texts:
        raise ValueError(f"no {'images' if not images else 'texts'} to compare: zero-shot needs at least one image "
                         "(--image) and one text (--text)")
    preprocess = image_transform(model.config.vision.image_size)
    pixels = torch.stack([preprocess(im) for im in images])  # (N, 3, H, W)
    device = next(model.parameters()).device
    with autocast_context(device, precision):
        image_features = model.encode_image(pixels.to(device)).float()
        text_features = model.encode_text(tokenize(texts, model.config.text.context_length).to(device)).float()
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    cosine = image_features @ text_features.T  # (N, T)
    return cosine, (model.logit_scale.exp() * cosine).softmax(dim=-1)


def print_zero_shot(names, texts, cosine, probs):
    width = max(len(t) for t in texts)
    for name, cos_row, prob_row in zip(names, cosine, probs):
        print(f"\n{name}")
        for i in prob_row.argsort(descending=True).tolist():
            print(f"  {texts[i]:<{width}}  cosine {cos_row[i]:+.4f}  prob {100 * prob_row[i]:6.2f}%")


def check_output(path, flag, folder=False):
    """Refuse, before the work, an output the results could not be written to: a file in a folder that does not
    exist, a file name that is a folder, or a folder (made with its parents) below a file."""
    if path is None:
        return
    path = Path(path)
    if folder:
        existing = next(p for p in [path, *path.parents] if p.exists())  # "." or "/" at the latest
        if not existing.is_dir():
            raise ValueError(f"{flag} {path}: {existing} is a file, not a folder: choose another {flag}")
    elif path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name, such as {path / 'results.json'}")
    elif not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist: create it, or choose another {flag}")


def existing_checkpoint(path):
    """A checkpoint path that exists, checked before the inputs are read (load_checkpoint reads the file last)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def cmd_zeroshot(args):
    """The checkpoint's path, images and texts are checked first: a typo fails at once, not after loading the model."""
    checkpoint = existing_checkpoint(args.checkpoint or find_tinyclip())
    blank = [i for i, t in enumerate(args.text, 1) if not t.strip()]
    if blank:
        raise ValueError(f"--text: text {blank[0]} is empty: give each text as one quoted argument, "
                         "such as --text \"a photo of a dog\" \"a photo of a cat\"")
    images = [load_image(p) for p in args.image]
    model = load_checkpoint(checkpoint, config=args.config, verbose=True)
    precision = precision_line("cpu", args.precision)
    print_zero_shot(args.image, args.text, *zero_shot(model, images, args.text, precision))


def cmd_retrieval(args, model=None):
    """Everything the evaluation reads and writes is checked first (outputs, captions and split, images, their
    headers), then the model loads and the images are encoded."""
    from data import check_images, read_captions
    from evaluate import evaluate_retrieval, format_results
    if model is None:
        existing_checkpoint(args.checkpoint)
    check_output(args.json, "--json")
    check_output(args.save_features, "--save-features", folder=True)
    records = read_captions(args.data, args.split or None)
    check_images(records, args.images, open_files=True)
    model = model or load_checkpoint(args.checkpoint, config=args.config, verbose=True)
    device = pick_device()
    precision = resolve_precision(device, args.precision)[0] if args.command is None else \
        precision_line(device, args.precision)
    results = evaluate_retrieval(model.to(device), records, args.images, protocol=args.protocol,
                                 split_name=args.split or "all", batch_size=args.batch_size, workers=args.workers,
                                 device=device, save_dir=args.save_features, precision=precision)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def cmd_default(args):
    """After `python train.py`: a zero-shot demo on a few built-in test images, then retrieval on the test split."""
    from data import read_captions
    from synthetic import ensure_shapes
    checkpoint = Path(args.checkpoint or DEFAULT_RUN)
    if not checkpoint.exists():
        sys.exit(f"error: {checkpoint} not found: run `python train.py` first (or see `python test.py --help`)")
    precision = precision_line("cpu", args.precision)
    model = load_checkpoint(checkpoint, verbose=True)
    data = ensure_shapes()
    picked = read_captions(data, "test")[:4]
    texts = [r.captions[0] for r in picked]  # the first caption of each picked image
    images = [load_image(data.parent / "images" / r.image) for r in picked]
    print("zero-shot: which caption belongs to which picture? (4 test images, their first captions)")
    print_zero_shot([r.image for r in picked], texts, *zero_shot(model, images, texts, precision))
    print()
    args.data, args.images, args.split, args.protocol = data, data.parent / "images", "test", "5cap"
    cmd_retrieval(args, model)
    print()
    args.json, args.n, args.scenes = checkpoint.parent / "probe.json", 200, "test"
    try:
        cmd_probe(args)
    except ValueError as e:  # e.g. a model whose context is too short for the probe's captions
        print(f"note: no probe: {error_line(e)}")


def cmd_anomaly(args):
    """Zero-shot anomaly detection and segmentation (aa_clip.py): per-category image AUROC, pixel AUROC and AP."""
    from aa_clip import load, resolve_test_data, test_report
    check_output(args.json, "--json")
    device = pick_device()
    precision = precision_line(device, args.precision)
    model, adapted, saved = load(args.checkpoint, args.init, args.img_size, device, precision)
    root, categories = resolve_test_data(args, saved)
    out = Path(args.out or ROOT / "out" / "anomaly" / Path(args.checkpoint).stem)
    report = test_report(model, root, categories, args, device, out, adapted=adapted)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def cmd_probe(args):
    """The zero-shot probe suite (probe.py) on new Shapes scenes: the checkpoint and the --json file are checked
    first, then the model loads; prints the table and writes the results (default: probe.json by the checkpoint)."""
    from probe import PROBE_SEED, PROBE_VAL_SEED, format_probe, run_probe
    if args.checkpoint is None and not DEFAULT_RUN.exists():
        raise FileNotFoundError(f"{DEFAULT_RUN} not found: run `python train.py` first, or pass --checkpoint")
    checkpoint = Path(existing_checkpoint(args.checkpoint or DEFAULT_RUN))
    seed = PROBE_VAL_SEED if args.scenes == "val" else PROBE_SEED
    out = Path(args.json) if args.json else checkpoint.parent / f"probe{'_val' if args.scenes == 'val' else ''}.json"
    check_output(out, "--json")
    model = load_checkpoint(checkpoint, verbose=True)
    device = pick_device()
    precision, why = resolve_precision(device, args.precision)
    print(f"probe: {args.n} new scenes per task (seed {seed}), device {device}, precision {precision} ({why})")
    results = run_probe(model.to(device), device, precision, n=args.n, seed=seed)
    print(format_probe(results))
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", help="the default run only: a model trained on the built-in data with another "
                                        "--out (default: out/shapes/last.pt)")
    sub = p.add_subparsers(dest="command")
    z = sub.add_parser("zeroshot", help="cosine similarity and softmax probability of each text for each image")
    z.add_argument("--checkpoint", help="any checkpoint load_checkpoint reads (default: a TinyCLIP file in model_hub/)")
    z.add_argument("--config", help="model JSON (needed only for flat state dicts of OpenAI weights: QuickGELU)")
    z.add_argument("--image", nargs="+", required=True)
    z.add_argument("--text", nargs="+", required=True)
    r = sub.add_parser("retrieval", help="image<->text recall@1/5/10 with FAISS exact search")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--config")
    r.add_argument("--data", required=True, help="Karpathy JSON, Flickr8k.token.txt, list JSON or CSV")
    r.add_argument("--images", required=True, help="image root")
    r.add_argument("--split", default="test",
                   help="split to evaluate ('' for every entry, e.g. the tutorial's en_val.json)")
    r.add_argument("--protocol", choices=["5cap", "1cap"], default="5cap",
                   help="5cap: every caption (standard); 1cap: the first caption per image (the tutorial)")
    r.add_argument("--json", help="write the results here")
    r.add_argument("--save-features", help="folder for the .npy features and their ids")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: chosen for the image size and the free cores)")
    a = sub.add_parser("anomaly", help="anomaly detection/segmentation AUROC and AP per category (AA-CLIP, aa_clip.py)")
    a.add_argument("--checkpoint", required=True,
                   help="an AA-CLIP file (train.py --method aa-clip) or any CLIP checkpoint")
    a.add_argument("--init", help="the CLIP an AA-CLIP file adapts, if it moved since training")
    a.add_argument("--data",
                   help="MVTec-AD or VisA root (default: the AA-CLIP file's test data, else the built-in set)")
    a.add_argument("--categories", nargs="+", help="default: the AA-CLIP file's test categories, else all of --data "
                                                   "(the built-in set: weave bolt)")
    a.add_argument("--img-size", type=int,
                   help="input size (default: the AA-CLIP file's; 2x the model's for a plain CLIP)")
    a.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps, in patches (default: the "
                                                               "AA-CLIP file's, else 1)")
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--out", help="folder for table.md and overlays/ (default: out/anomaly/CHECKPOINT_NAME)")
    a.add_argument("--json", help="write the results here")
    b = sub.add_parser("probe", help="zero-shot probe suite on new Shapes scenes: shape, colour, size, position, "
                                     "count, attribute binding, spatial relations (probe.py)")
    b.add_argument("--checkpoint", help="default: the default run, out/shapes/last.pt")
    b.add_argument("--json", help="write the results here (default: probe.json in the checkpoint's folder)")
    b.add_argument("--n", type=int_at_least(1), default=200, help="scenes per task (default: 200)")
    b.add_argument("--scenes", choices=["test", "val"], default="test",
                   help="test: the reported scenes; val: other scenes, for choosing training settings")
    for parser in (p, z, r, a, b):
        parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                            help="autocast dtype (auto: bf16 where the GPU or CPU multiplies bf16 natively, else fp32)")
    p.set_defaults(save_features=None, json=None, batch_size=256, workers=None)  # for the default command
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    plain_warnings()
    command = {"zeroshot": cmd_zeroshot, "retrieval": cmd_retrieval, "anomaly": cmd_anomaly, "probe": cmd_probe,
               None: cmd_default}
    try:
        command[args.command](args)
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {error_line(e)}")  # one line, also for an error a DataLoader worker raised


if __name__ == "__main__":
    main()
