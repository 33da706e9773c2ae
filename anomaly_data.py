"""
Anomaly-detection data: a built-in synthetic dataset in the MVTec-AD layout, the MVTec-AD and VisA readers,
a Dataset that returns (image, label, pixel mask) with the mask cropped exactly like the image, the held-out
split and joint image/mask augmentation AA-CLIP trains with, and anomaly-map overlay PNGs.

The synthetic set stands in for MVTec-AD so the AA-CLIP experiments (aa_clip.py) run offline. Six procedurally
drawn categories (three textures, three objects), each with four defect types and an exact pixel mask per defect:

    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect>/000.png
    ROOT/<category>/ground_truth/<defect>/000_mask.png    (0/255, same size as the image)
    ROOT/anomaly_params.json                               (written last: a complete dataset exists)

Design notes:
  - Image `index` of (category, part) is drawn from generators seeded with (seed, category, part, index), so
    any image can be redrawn alone. Drawing is at SUPERSAMPLE x resolution and box-filtered down, as in
    synthetic.py; a pixel belongs to the mask when at least half of it is covered by the defect.
  - On objects (tablet, bolt, washer) a defect is clipped to the object, as in MVTec, where defects lie on the part.
  - Category names avoid MVTec/VisA names (tile, pill, screw...), so the synthetic set never shadows them.

References:
- MVTec-AD, Bergmann et al., CVPR 2019: https://www.mvtec.com/company/research/datasets/mvtec-ad
- VisA, Zou et al., ECCV 2022 ("SPot-the-Difference"): https://github.com/amazon-science/spot-diff
- AA-CLIP, Ma et al., CVPR 2025, arXiv 2503.06661: https://github.com/Mwxinnn/AA-CLIP

Usage:
    python anomaly_data.py --preview anomaly.png    # generate data/anomaly (seconds) and save a preview grid
"""

import argparse
import csv
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor, v2
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from data import make_loader, sample_rng
from transform import IMAGE_EXTENSIONS, OPENAI_MEAN, OPENAI_STD, load_image

VERSION = 2  # bump when the drawing code changes, so cached datasets are regenerated
DEFAULT_ROOT = Path(__file__).parent / "data" / "anomaly"
PARAMS_NAME = "anomaly_params.json"
SUPERSAMPLE = 4
CATEGORIES = ["tiles", "weave", "tablet", "bolt", "planks", "washer"]  # new ones go last: the seeds use the index
DEFECTS = ["scratch", "hole", "stain", "crack"]

# ----------------------------------------------------------------------------------------------------------
# Drawing: each category returns an (S, S, 3) float image and the (S, S) boolean region a defect may touch


def _grid(S):
    y, x = np.mgrid[0:S, 0:S] / S  # (S, S) coordinates in [0, 1)
    return y, x


def _tiles(rng, S):
    y, x = _grid(S)
    period, (ox, oy) = rng.uniform(0.22, 0.28), rng.uniform(0, 1, 2)
    colour = np.array([196, 180, 150]) + rng.integers(-15, 16, 3)
    tile_id = np.floor((x + ox) / period) + 7 * np.floor((y + oy) / period)
    shade = 1 + 0.06 * np.sin(tile_id * 12.9898 + rng.uniform(0, 6.3))  # each tile a slightly other shade
    img = colour * shade[..., None]
    grout = (((x + ox) % period) < 0.025) | (((y + oy) % period) < 0.025)
    img[grout] = [110, 105, 100]
    return img, np.ones((S, S), bool)


def _weave(rng, S):
    y, x = _grid(S)
    freq, a = rng.uniform(14, 18), rng.uniform(-0.15, 0.15)  # threads per image side, small rotation
    u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
    pattern = np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v)  # over-under crossings
    colour = np.array([70, 90, 150]) + rng.integers(-15, 16, 3)
    return colour * (1 + 0.25 * pattern[..., None]), np.ones((S, S), bool)


def _tablet(rng, S):
    y, x = _grid(S)
    img = np.broadcast_to(np.array([40, 40, 45]) + rng.integers(-5, 6, 3), (S, S, 3)).astype(float)
    (cx, cy), a = 0.5 + rng.uniform(-0.05, 0.05, 2), rng.uniform(0, np.pi)
    rx, ry = rng.uniform(0.36, 0.42), rng.uniform(0.2, 0.25)
    u, v = np.cos(a) * (x - cx) + np.sin(a) * (y - cy), -np.sin(a) * (x - cx) + np.cos(a) * (y - cy)
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1
    img[inside] = np.array([235, 225, 205]) * (1 - 0.12 * (u[inside] / rx) ** 2)[:, None]  # rounded look
    img[inside & (np.abs(v) < 0.012) & (np.abs(u) < 0.6 * rx)] = [185, 175, 160]  # the break line
    return img, inside


def _bolt(rng, S):
    y, x = _grid(S)
    img = np.broadcast_to(np.array([205, 205, 210]) + rng.integers(-8, 9, 3), (S, S, 3)).astype(float)
    (cx, cy), a = 0.5 + rng.uniform(-0.04, 0.04, 2), rng.uniform(-0.6, 0.6)
    u, v = np.cos(a) * (x - cx) + np.sin(a) * (y - cy), -np.sin(a) * (x - cx) + np.cos(a) * (y - cy)
    shaft = (np.abs(u + 0.05) < 0.33) & (np.abs(v) < 0.07)
    head = ((u - 0.33) / 0.09) ** 2 + (v / 0.15) ** 2 <= 1
    threads = np.sin(2 * np.pi * u / rng.uniform(0.035, 0.045)) > 0.3
    img[shaft] = [120, 120, 128]
    img[shaft & threads] = [85, 85, 92]
    img[head] = [140, 140, 148]
    return img, shaft | head


def _planks(rng, S):
    y, x = _grid(S)
    width, oy = rng.uniform(0.18, 0.24), rng.uniform(0, 1)
    plank = np.floor((y + oy) / width)  # (S, S) index of the board each pixel is on
    colour = np.array([150, 105, 65]) + rng.integers(-15, 16, 3)
    wobble = 0.015 * np.sin(2 * np.pi * (x * rng.uniform(1, 2) + plank * 0.37))
    grain = np.sin(2 * np.pi * rng.uniform(25, 35) * (y + wobble))  # fine lines along the boards
    shade = 1 + 0.08 * np.sin(plank * 5.1 + rng.uniform(0, 6.3))  # each board a slightly other shade
    img = colour * (shade * (1 + 0.08 * grain))[..., None]
    img[((y + oy) % width) < 0.015] = [70, 50, 35]  # the gaps between boards
    return img, np.ones((S, S), bool)


def _washer(rng, S):
    y, x = _grid(S)
    img = np.broadcast_to(np.array([60, 72, 66]) + rng.integers(-6, 7, 3), (S, S, 3)).astype(float)
    (cx, cy), outer = 0.5 + rng.uniform(-0.05, 0.05, 2), rng.uniform(0.32, 0.38)
    r = np.hypot(x - cx, y - cy)
    ring = (r <= outer) & (r >= outer * rng.uniform(0.4, 0.5))
    light = 1 + 0.15 * np.cos(np.arctan2(y - cy, x - cx) - rng.uniform(0, 2 * np.pi))  # light from one side
    img[ring] = np.array([195, 160, 85]) * light[ring][:, None]  # brass
    return img, ring


DRAW = {"tiles": _tiles, "weave": _weave, "tablet": _tablet, "bolt": _bolt, "planks": _planks, "washer": _washer}

# ----------------------------------------------------------------------------------------------------------
# Defects: a shape drawn into an "L" mask at SUPERSAMPLE x, then a colour blended in where the mask is on


def _defect_shape(defect, rng, S, centre):
    mask = Image.new("L", (S, S), 0)
    draw, (cx, cy) = ImageDraw.Draw(mask), centre
    if defect == "scratch":  # a long thin straight line
        a, half = rng.uniform(0, np.pi), S * rng.uniform(0.15, 0.3)
        d = np.array([np.cos(a), np.sin(a)]) * half
        draw.line([(cx - d[0], cy - d[1]), (cx + d[0], cy + d[1])], fill=255, width=int(1.5 * SUPERSAMPLE))
    elif defect == "hole":  # a dark ellipse
        rx, ry = S * rng.uniform(0.05, 0.09, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif defect == "stain":  # a blob: a few overlapping ellipses
        for _ in range(4):
            ox, oy = S * rng.uniform(-0.05, 0.05, 2)
            rx, ry = S * rng.uniform(0.04, 0.08, 2)
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    else:  # crack: a jagged random walk
        a, points = rng.uniform(0, 2 * np.pi), [(cx, cy)]
        for _ in range(6):
            a += rng.uniform(-0.9, 0.9)
            step = S * rng.uniform(0.04, 0.07)
            points.append((points[-1][0] + step * np.cos(a), points[-1][1] + step * np.sin(a)))
        draw.line(points, fill=255, width=int(1.2 * SUPERSAMPLE), joint="curve")
    return np.asarray(mask) > 127


DEFECT_COLOURS = {"scratch": (235, 235, 225), "hole": (20, 18, 16), "stain": (140, 90, 30), "crack": (35, 30, 28)}
SCRATCH_ON_LIGHT = (105, 100, 95)


def _add_defect(img, region, defect, rng):
    """Blend a defect into img (in place) inside region; return its (S, S) boolean mask."""
    S = img.shape[0]
    ys, xs = np.nonzero(region[S // 8: -S // 8, S // 8: -S // 8])  # centre away from the border
    k = rng.integers(len(ys))
    mask = _defect_shape(defect, rng, S, (xs[k] + S // 8, ys[k] + S // 8)) & region
    alpha = 0.75 if defect == "stain" else 1.0  # a stain lets the texture show through
    colour = np.array(DEFECT_COLOURS[defect])
    if defect == "scratch" and img[mask].mean() > 170:  # a scratch shows light on dark surfaces, dark on light ones
        colour = np.array(SCRATCH_ON_LIGHT)
    img[mask] = (1 - alpha) * img[mask] + alpha * colour
    return mask


def _downsample(array, size):
    """(S, S[, 3]) -> (size, size[, 3]) by averaging SUPERSAMPLE x SUPERSAMPLE blocks (a box filter)."""
    f = array.shape[0] // size
    return array.reshape(size, f, size, f, *array.shape[2:]).mean(axis=(1, 3))


def draw_image(category, seed, part, index, image_size=64, defect=None):
    """One image (uint8 (H, W, 3)) and its mask (uint8 (H, W), 0/255; all zero for a good image)."""
    c, p = CATEGORIES.index(category), ["train", "test_good", "test_defect"].index(part)
    rng = np.random.default_rng([seed, c, p, index])
    img, region = DRAW[category](rng, image_size * SUPERSAMPLE)
    img, mask = np.array(img, dtype=float), np.zeros((image_size, image_size), np.uint8)
    if defect is not None:
        for attempt in range(20):  # redraw in the rare case the defect covers no pixel by half (still seeded)
            candidate = img.copy()
            defect_ss = _add_defect(candidate, region, defect, np.random.default_rng([seed, c, p, index, attempt]))
            mask = (_downsample(defect_ss.astype(float), image_size) >= 0.5).astype(np.uint8) * 255
            if mask.any():
                break
        img = candidate
    small = _downsample(img, image_size) + rng.normal(0, 3, (image_size, image_size, 3))  # sensor noise
    return np.clip(np.round(small), 0, 255).astype(np.uint8), mask

# ----------------------------------------------------------------------------------------------------------
# Writing and caching the dataset


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def generate_category(root, category, seed, image_size, n_train, n_test_good, n_test_defect):
    """Write one category's folders; test defect images cycle through DEFECTS, numbered per defect."""
    base = Path(root) / category
    shutil.rmtree(base, ignore_errors=True)  # leftovers of an earlier, larger dataset; names never clash with MVTec
    for i in range(n_train):
        _save(draw_image(category, seed, "train", i, image_size)[0], base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(draw_image(category, seed, "test_good", i, image_size)[0], base / "test" / "good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        defect, k = DEFECTS[i % len(DEFECTS)], i // len(DEFECTS)
        image, mask = draw_image(category, seed, "test_defect", i, image_size, defect)
        _save(image, base / "test" / defect / f"{k:03d}.png")
        _save(mask, base / "ground_truth" / defect / f"{k:03d}_mask.png")


def ensure_anomaly_shapes(root=None, seed=0, image_size=128, n_train=40, n_test_good=40, n_test_defect=80,
                          categories=tuple(CATEGORIES)):
    """The synthetic MVTec-layout root, generating it first unless its params file matches. root=None: data/anomaly."""
    root = Path(root) if root else DEFAULT_ROOT
    if not set(categories) <= set(CATEGORIES):
        raise ValueError(f"unknown categories {sorted(set(categories) - set(CATEGORIES))}; choose from {CATEGORIES}")
    params = dict(version=VERSION, seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                  n_test_defect=n_test_defect, categories=list(categories))
    params_path = root / PARAMS_NAME
    try:
        if json.loads(params_path.read_text()) == params:
            return root
        print(f"{params_path} was made with other parameters; regenerating")
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    params_path.unlink(missing_ok=True)  # an interrupted run leaves no params file, so it is redone next time
    for category in categories:
        generate_category(root, category, seed, image_size, n_train, n_test_good, n_test_defect)
    tmp = params_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, params_path)  # atomic: the params file exists only once every image is written
    return root

# ----------------------------------------------------------------------------------------------------------
# Readers. Every reader returns a list of (image_path, label 0/1, mask_path or None, defect_name).


def _images_in(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_mvtec(root, category, split):
    """MVTec-AD layout: label 0 for test/good and train/good, 1 for every other test/<defect> folder."""
    root, base = Path(root), Path(root) / category
    if not base.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"no category folder {base}; categories in {root}: {', '.join(found) or 'none'}")
    if not (base / split).is_dir():
        raise FileNotFoundError(f"no split folder {base / split} (MVTec-AD has train and test)")
    items = []
    for folder in sorted(p for p in (base / split).iterdir() if p.is_dir()):
        for image in _images_in(folder):
            if folder.name == "good":
                items.append((image, 0, None, "good"))
                continue
            mask = base / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"mask {mask} is missing for the defective image {image}")
            items.append((image, 1, mask, folder.name))
    if not items:
        raise FileNotFoundError(f"no images under {base / split}")
    return items


def read_visa(root, category, split, csv_path=None):
    """VisA: rows of its split CSV (default root/split_csv/1cls.csv; columns object, split, label, image, mask)."""
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split file {csv_path} not found")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    objects = sorted({r["object"] for r in rows})
    if category not in objects:
        raise ValueError(f"no object {category!r} in {csv_path}; objects: {', '.join(objects)}")
    items = []
    for r in rows:
        if r["object"] != category or r["split"] != split:
            continue
        if r["label"] not in ("normal", "anomaly"):
            raise ValueError(f"{csv_path}: label {r['label']!r} for {r['image']} is not 'normal' or 'anomaly'")
        if r["label"] == "normal":
            items.append((root / r["image"], 0, None, "good"))
            continue
        mask = root / r["mask"] if r["mask"] else None
        if mask is None or not mask.is_file():
            raise FileNotFoundError(f"{csv_path}: mask {mask} is missing for the anomalous image {r['image']}")
        items.append((root / r["image"], 1, mask, "anomaly"))  # VisA's CSV does not name the defect type
    if not items:
        raise ValueError(f"no {split!r} rows for {category!r} in {csv_path}")
    return items


class AnomalyDataset(Dataset):
    """(image (3, H, W) normalised, label, mask (1, H, W) in {0, 1}). Image and mask are resized to a square
    WITHOUT cropping (as AA-CLIP does): CLIP's centre crop would cut defects off the sides of non-square images
    such as VisA's. The mask uses NEAREST, so it stays binary and pixel (i, j) belongs to image pixel (i, j).
    `augment`, if given, is called as augment(image, mask) on the PIL pair first (the same geometry for both)."""

    def __init__(self, items, image_size, augment=None):
        self.items, self.image_size, self.augment = list(items), image_size, augment
        square = (image_size, image_size)
        self.transform = Compose([Resize(square, InterpolationMode.BICUBIC), ToTensor(),
                                  Normalize(OPENAI_MEAN, OPENAI_STD)])
        self.mask_transform = Resize(square, InterpolationMode.NEAREST)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, mask_path, _ = self.items[i]
        image = load_image(path)
        mask = read_mask(mask_path, image.size, path)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
            if label and mask.getbbox() is None:  # the augmentation moved the whole defect out of view: normal
                label = 0
        mask = torch.from_numpy(np.asarray(self.mask_transform(mask)) > 0).float()[None]  # (1, H, W)
        return self.transform(image), label, mask


def read_mask(mask_path, size, image_path):
    """A PIL "L" mask (> 0 = defect) of the image's size; all zero when mask_path is None (a good image)."""
    if mask_path is None:
        return Image.new("L", size, 0)
    with Image.open(mask_path) as m:
        mask = m.convert("L")  # VisA masks hold 0/1 (or a defect id), MVTec masks 0/255: binarise with > 0
    if mask.size != size:
        raise ValueError(f"mask {mask_path} is {mask.size}, its image {image_path} is {size}")
    return mask

# ----------------------------------------------------------------------------------------------------------
# Training data for the anomaly adapters (aa_clip.py): categories, a held-out split, joint augmentation




def is_visa(root):
    return (Path(root) / "split_csv" / "1cls.csv").is_file()


def list_categories(root):
    root = Path(root)
    if is_visa(root):
        with open(root / "split_csv" / "1cls.csv", newline="") as f:
            return sorted({r["object"] for r in csv.DictReader(f)})
    if not root.is_dir():
        raise FileNotFoundError(f"anomaly data folder {root} not found")
    found = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not found:
        raise ValueError(f"no categories in {root}: expected MVTec-AD folders <category>/test/ (or a VisA root with "
                         "split_csv/1cls.csv); pass the dataset root, not one category")
    return found


def read_items(root, category, split):
    return read_visa(root, category, split) if is_visa(root) else read_mvtec(root, category, split)


def split_train_val(root, categories, val_fraction, shots, seed):
    """Every image of the training categories (as AA-CLIP trains on all of VisA), less a seeded, stratified
    val_fraction of each category's test images kept for checkpoint selection. shots > 0: that many training
    images per category. Returns two lists of (item, category)."""
    train, val = [], []
    for c in categories:
        rng, test = random.Random(f"{seed}-{c}"), read_items(root, c, "test")
        held = []
        for label in (0, 1):
            group = [it for it in test if it[1] == label]
            k = round(val_fraction * len(group))
            if k == 0:
                raise ValueError(f"category {c!r} of {root}: --val-fraction {val_fraction} of its {len(group)} "
                                 f"{'defective' if label else 'good'} test images holds out none; "
                                 "validation needs both kinds")
            held += rng.sample(group, k)
        held_set = set(held)
        pool = [it for it in read_items(root, c, "train") + test if it not in held_set]
        if shots:
            pool = rng.sample(pool, min(shots, len(pool)))
        train += [(it, c) for it in pool]
        val += [(it, c) for it in held]
    return train, val


def augmentation(colour):
    """AA-CLIP's training augmentation: rotation +-30 degrees, translation 15 %, flips (the same for the image and
    its mask); colour jitter (image only) in the image stage."""
    geometry = v2.Compose([v2.RandomAffine(degrees=30, translate=(0.15, 0.15),
                                           interpolation=v2.InterpolationMode.BILINEAR),
                           v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
    jitter = v2.ColorJitter(0.2, 0.2, 0.2) if colour else None

    def augment(image, mask):
        image, mask = geometry(image, tv_tensors.Mask(pil_to_tensor(mask)))  # masks are moved with NEAREST
        return (jitter(image) if jitter else image), to_pil_image(mask)
    return augment


class CategoryDataset(AnomalyDataset):
    """AnomalyDataset items that also return their category's index, for the per-image text anchors. Keys may be
    (epoch, index) pairs from data.EpochSampler: the augmentation is then drawn from a seed that depends only on
    (seed, epoch, index), not on the worker or on what ran before, so a resumed run repeats an epoch exactly."""

    def __init__(self, pairs, categories, image_size, augment=None, seed=0):
        super().__init__([it for it, _ in pairs], image_size, augment)
        self.category, self.seed = [categories.index(c) for _, c in pairs], seed

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(sample_rng(self.seed, epoch, i).getrandbits(63))  # torchvision's v2 draws from torch
            return (*super().__getitem__(i), self.category[i])


def loader(pairs, categories, size, batch_size, workers, augment=None, seed=0, device="cpu"):
    """data.make_loader over a CategoryDataset. Evaluation: in order. Training (augment given): EpochSampler's
    shuffled order, a function of (seed, epoch), every image, the default collate; call
    loader.sampler.set_epoch(epoch) before each epoch."""
    dataset = CategoryDataset(pairs, categories, size, augment, seed)
    return make_loader(dataset, batch_size, augment is not None, seed, workers, device, drop_last=False,
                       collate_fn=None)

# ----------------------------------------------------------------------------------------------------------
# Previews, anomaly-map overlays and the command line


def overlay(image, mask, colour=(255, 0, 0), alpha=0.5):
    """RGB PIL image with the mask (PIL "L", >0 = defect) tinted in `colour`; used for previews and anomaly maps."""
    rgb = np.asarray(image.convert("RGB")).astype(float)
    on = (np.asarray(mask) > 0)[..., None]
    return Image.fromarray(np.where(on, (1 - alpha) * rgb + alpha * np.array(colour), rgb).astype(np.uint8))


def showcase(items, n):
    """Indices of up to n items to show: defective ones first, one of each defect type before the second of any,
    then two (or more, if defects run out) good ones."""
    bad = sorted((i for i, it in enumerate(items) if it[1]), key=lambda i: (Path(items[i][0]).stem, items[i][3]))
    picked = bad[:n - 2]
    return picked + [i for i, it in enumerate(items) if not it[1]][:n - len(picked)]


def save_preview(root, out, categories=None, per_row=6, scale=3):
    """A grid PNG: per category a row of test images (defects, then two good ones), each above its mask overlay."""
    root, rows = Path(root), []
    for category in categories or [c for c in CATEGORIES if (Path(root) / c).is_dir()]:
        items = read_mvtec(root, category, "test")
        rows.append([items[i] for i in showcase(items, per_row)])
    side = Image.open(rows[0][0][0]).width * scale
    sheet = Image.new("RGB", (per_row * (side + 4) + 4, len(rows) * (2 * side + 12) + 4), "white")
    for r, row in enumerate(rows):
        for k, (path, _, mask_path, defect) in enumerate(row):
            image = Image.open(path).convert("RGB")
            mask = read_mask(mask_path, image.size, path)
            x, y = 4 + k * (side + 4), 4 + r * (2 * side + 12)
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
            sheet.paste(overlay(image, mask).resize((side, side), Image.Resampling.NEAREST), (x, y + side + 2))
    sheet.save(out)
    print(f"saved a preview of {len(rows)} categories to {out}")


def heat(values):
    """[0, 1] array -> RGB uint8, blue (normal) to red (anomalous), a short jet-like ramp."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3, 2, 1])), 0, 1)
    return (255 * rgb).astype(np.uint8)


def save_overlays(kept, out, size, per_category=8):
    """One PNG per category: defective then good test images in columns; rows image / true mask / anomaly map."""
    view, mask_view = Resize((size, size), InterpolationMode.BICUBIC), Resize((size, size), InterpolationMode.NEAREST)
    out.mkdir(parents=True, exist_ok=True)
    for c, (pairs, maps) in kept.items():
        order = showcase([it for it, _ in pairs], per_category)
        sheet = Image.new("RGB", (len(order) * (size + 2), 3 * (size + 2)), "white")
        for col, i in enumerate(order):
            (path, _, mask_path, _), _ = pairs[i]
            original = load_image(path)
            image, mask = view(original), mask_view(read_mask(mask_path, original.size, path))
            blend = Image.blend(image, Image.fromarray(heat(maps[i].numpy())), 0.5)
            for row, tile in enumerate((image, overlay(image, mask), blend)):
                sheet.paste(tile, (col * (size + 2), row * (size + 2)))
        sheet.save(out / f"{c}.png")


if __name__ == "__main__":
    import time
    parser = argparse.ArgumentParser(description="Generate the synthetic anomaly dataset (MVTec-AD layout).")
    parser.add_argument("--root", default=None, help="output folder (default: data/anomaly)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--preview", default=None, help="also save a grid of test images with mask overlays here")
    args = parser.parse_args()
    start = time.time()
    root = ensure_anomaly_shapes(args.root, args.seed, args.image_size)
    print(f"dataset: {root} ({time.time() - start:.1f} s)")
    for category in json.loads((root / PARAMS_NAME).read_text())["categories"]:
        test = read_mvtec(root, category, "test")
        print(f"{category:7s}: {len(read_mvtec(root, category, 'train'))} train, {len(test)} test "
              f"({sum(label for _, label, _, _ in test)} defective)")
    if args.preview:
        save_preview(root, args.preview)
