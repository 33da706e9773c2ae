"""
Shapes: the project's built-in image-caption dataset, drawn procedurally so the quick start needs no download.

Each 64x64 image holds one or two coloured shapes on a background; each comes with five English captions
that name every object's colour and shape, and most of the time the background, sizes and positions:

    "A small red star to the left of a large blue hexagon on a striped background."
    "On the left is a scarlet star and on the right is a blue six-sided shape."

The dataset is written in the Karpathy caption layout of Flickr8k/30k and COCO (dataset_*.json, see
https://cs.stanford.edu/people/karpathy/deepimagesent/), so training and retrieval evaluation read it with
exactly the code they use for Flickr:

    ROOT/dataset_shapes.json   {"dataset": "shapes", "params": {...}, "images": [{"filename", "imgid", "split",
                               "sentids", "sentences": [{"raw", "tokens", "imgid", "sentid"}], "attributes"}]}
    ROOT/images/000123.png

"attributes" is extra: the scene record (background, layout, and per object shape/colour/size/position),
which the adapters use for shape-classification labels.

Design notes:
  - Everything about image i comes from random generators seeded with (seed, i), so images can be drawn in
    any order, in parallel, and reproduced one at a time. The scene (objects, layout, jitter) and the
    captions use their own generators, so a different drawing style re-draws the same scenes.
  - Shapes are drawn at 4x resolution and box-filtered down (anti-aliasing), with small sizes of ~17 px and
    large of ~27 px, so that shape and colour are clearly visible at 64x64.
  - A drawing *style* is a palette, a set of named backgrounds and the ways an object may be filled.
    "default" is the training domain; "shifted" (other shades, textured backgrounds, outlined or striped
    shapes, pixel noise and blur) is a shifted domain for few-shot experiments. To add a style, add an entry
    to STYLES; the caption words stay the same, only the pixels change.

Usage:
    python synthetic.py                       # generate data/shapes (about a minute) and print statistics
    python synthetic.py --preview shapes.png  # also save a grid of test images with their captions
    python synthetic.py --style shifted       # the shifted domain, in data/shapes_shifted
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

VERSION = 1  # bump when the drawing or caption code changes, so cached datasets are regenerated
DATA_DIR = Path(__file__).parent / "data"
DEFAULT_ROOT = DATA_DIR / "shapes"
JSON_NAME = "dataset_shapes.json"
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges at 64x64

# ----------------------------------------------------------------------------------------------------------
# The attribute space: 8 shapes x 8 colours x 2 sizes, 5 single positions or 2 two-object layouts, 6 backgrounds

SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "white"]
SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side (diameter ~17 px / ~27 px)
SINGLE_POSITIONS = {"centre": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5),
                    "top": (0.5, 0.27), "bottom": (0.5, 0.73)}  # centre (x, y) as fractions of the side
PAIR_POSITIONS = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74)}
P_SINGLE = 0.5  # fraction of images with one object; the rest have two (side by side or one above the other)


def _regular(n, radius=1.0, phase=-90.0):
    """n corners of a regular polygon of the given radius, the first at `phase` degrees (-90 = top)."""
    return [(radius * math.cos(math.radians(phase + 360 * k / n)),
             radius * math.sin(math.radians(phase + 360 * k / n))) for k in range(n)]


def _heart(n=60):
    """The classic parametric heart curve, scaled to about [-1, 1]."""
    ts = [2 * math.pi * k / n for k in range(n)]
    return [(0.95 * math.sin(t) ** 3,
             -0.95 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t) + 2.5) / 15)
            for t in ts]


_W, _E = 0.32, 0.95  # cross: half-width of an arm, half-length of an arm
UNIT_SHAPES = {  # outlines around (0, 0) with radius about 1; image y points down
    "circle": _regular(64, 0.9),
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(1.1 * x, 1.1 * y + 0.25) for x, y in _regular(3)],  # moved down so its box is centred
    "star": [p for pair in zip(_regular(5), _regular(5, 0.45, -54)) for p in pair],
    "heart": _heart(),
    "cross": [(-_W, -_E), (_W, -_E), (_W, -_W), (_E, -_W), (_E, _W), (_W, _W), (_W, _E), (-_W, _E),
              (-_W, _W), (-_E, _W), (-_E, -_W), (-_W, -_W)],
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],  # taller than wide, so never a tilted square
    "hexagon": _regular(6, 0.95, 0),
}

# ----------------------------------------------------------------------------------------------------------
# Drawing styles. A background function takes (rng, side in pixels) and returns an (S, S, 3) uint8 array.


@lru_cache(maxsize=4)
def _grid(S):
    return np.mgrid[0:S, 0:S].astype(np.float32) / S  # (2, S, S): y, x in [0, 1)


def _fill(rng, S, lo, hi):
    return np.full((S, S, 3), rng.integers(lo, hi), np.uint8)


def _gradient(rng, S):
    y, x = _grid(S)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * x + np.sin(a) * y
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = rng.integers(0, 100, 3).astype(np.float32), rng.integers(0, 100, 3).astype(np.float32)  # two dark colours
    return (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)


def _stripes(rng, S):
    y, x = _grid(S)
    a = rng.choice([0, 0.25, 0.5, 0.75]) * np.pi  # horizontal, vertical or diagonal
    period = rng.uniform(0.09, 0.13)
    on = ((np.cos(a) * x + np.sin(a) * y) / period + rng.uniform()) % 1 < 0.5
    g = int(rng.integers(40, 70))
    return np.where(on[..., None], g + 45, g).astype(np.uint8).repeat(3, axis=2)


def _dots(rng, S):
    y, x = _grid(S)
    period = rng.uniform(0.11, 0.14)
    dy, dx = (y / period + rng.uniform()) % 1 - 0.5, (x / period + rng.uniform()) % 1 - 0.5
    dot = dx ** 2 + dy ** 2 < 0.18 ** 2
    g = int(rng.integers(35, 60))
    return np.where(dot[..., None], g + 80, g).astype(np.uint8).repeat(3, axis=2)


def _checks(rng, S):
    y, x = _grid(S)
    cell = rng.uniform(0.11, 0.15)
    on = (np.floor(x / cell + rng.uniform()) + np.floor(y / cell + rng.uniform())) % 2 == 1
    g = int(rng.integers(40, 65))
    return np.where(on[..., None], g + 40, g).astype(np.uint8).repeat(3, axis=2)


def _noise(rng, S, cells, amount, base):
    """Value noise: random colours on a cells x cells grid, smoothly upsampled, around a base colour."""
    small = rng.normal(0, amount, (cells, cells, 3)) + base
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((S, S), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _speckles(rng, S):
    img = _fill(rng, S, 30, 60).astype(np.int16)
    n = S * S // (SUPERSAMPLE * SUPERSAMPLE) // 6  # about one speckle per 6 output pixels
    ys, xs = rng.integers(0, S - SUPERSAMPLE, n), rng.integers(0, S - SUPERSAMPLE, n)
    for y, x, v in zip(ys, xs, rng.integers(60, 140, n)):
        img[y:y + SUPERSAMPLE, x:x + SUPERSAMPLE] += v
    return np.clip(img, 0, 255).astype(np.uint8)


def _plaid(rng, S):
    y, x = _grid(S)
    base = rng.integers(30, 80, 3)
    lines = ((x / 0.16 % 1) < 0.2).astype(np.float32) + ((y / 0.16 % 1) < 0.2)
    return np.clip(base + 35 * lines[..., None], 0, 255).astype(np.uint8)


def _bricks(rng, S):
    y, x = _grid(S)
    row = np.floor(y / 0.125)
    mortar = ((y / 0.125) % 1 < 0.15) | (((x / 0.25) + 0.5 * (row % 2)) % 1 < 0.07)
    return np.where(mortar[..., None], np.array([70, 70, 70]), np.array([110, 50, 40])).astype(np.uint8)


def _waves(rng, S):
    y, x = _grid(S)
    t = np.sin(2 * np.pi * (y * rng.uniform(4, 7) + 0.08 * np.sin(2 * np.pi * x * rng.uniform(2, 4))))
    c0, c1 = rng.integers(20, 90, 3), rng.integers(20, 90, 3)
    return (c0 + (t[..., None] + 1) / 2 * (c1 - c0)).astype(np.uint8)


@dataclass
class Style:
    palette: dict  # colour name -> RGB; the caption words are the same in every style
    backgrounds: dict  # background name (used in captions) -> function(rng, S) -> (S, S, 3) uint8
    fills: tuple  # how an object may be filled: "solid", "outline", "striped"
    noise: float = 0.0  # std of Gaussian pixel noise added to the final image
    blur: float = 0.0  # radius of a Gaussian blur applied to the final image


STYLES = {
    "default": Style(
        palette={"red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (245, 220, 30), "green": (40, 180, 60),
                 "blue": (40, 90, 240), "purple": (150, 60, 210), "pink": (255, 120, 190), "white": (245, 245, 245)},
        backgrounds={"black": lambda rng, S: _fill(rng, S, 5, 25), "gray": lambda rng, S: _fill(rng, S, 110, 140),
                     "gradient": _gradient, "striped": _stripes, "dotted": _dots, "checkered": _checks},
        fills=("solid",)),
    "shifted": Style(  # other shades of the same colour names, textured backgrounds, non-solid fills, noise
        palette={"red": (170, 30, 50), "orange": (215, 110, 40), "yellow": (210, 195, 90), "green": (110, 205, 130),
                 "blue": (70, 140, 205), "purple": (125, 80, 165), "pink": (235, 165, 205), "white": (215, 215, 195)},
        backgrounds={"noisy": lambda rng, S: _noise(rng, S, 32, 30, 80),
                     "cloudy": lambda rng, S: _noise(rng, S, 5, 35, 70),
                     "speckled": _speckles, "plaid": _plaid, "brick": _bricks, "wavy": _waves},
        fills=("solid", "outline", "striped"), noise=8.0, blur=0.5),
}

# ----------------------------------------------------------------------------------------------------------
# Scenes: what is in image i (shared by all styles), then how it is drawn


def sample_scene(rng, backgrounds):
    """Pick background, layout and objects, with jittered centre/radius/angle (as fractions of the side)."""
    scene = {"background": str(rng.choice(backgrounds)), "objects": []}
    if rng.random() < P_SINGLE:
        scene["layout"] = "single"
        places = [(str(rng.choice(list(SINGLE_POSITIONS))), 0.04, 0.04)]  # (position, x jitter, y jitter)
    elif rng.random() < 0.5:  # first object on the left, second on the right
        scene["layout"] = "horizontal"
        places = [("left", 0.03, 0.1), ("right", 0.03, 0.1)]
    else:  # first object at the top, second at the bottom
        scene["layout"] = "vertical"
        places = [("top", 0.1, 0.03), ("bottom", 0.1, 0.03)]
    taken = set()
    for position, jx, jy in places:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOURS))
        while (shape, colour) in taken:  # two objects never share both shape and colour: captions tell them apart
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOURS))
        taken.add((shape, colour))
        size = str(rng.choice(list(SIZES)))
        x, y = (SINGLE_POSITIONS if scene["layout"] == "single" else PAIR_POSITIONS)[position]
        scene["objects"].append({
            "shape": shape, "colour": colour, "size": size, "position": position,
            "center": [round(x + rng.uniform(-jx, jx), 4), round(y + rng.uniform(-jy, jy), 4)],
            "radius": round(SIZES[size] * rng.uniform(0.94, 1.06), 4),
            "angle": 0.0 if shape == "circle" else round(rng.uniform(-15, 15), 1)})
    return scene


def minimal_twin(scene, rng):
    """The scene with exactly one thing changed, so that only that thing tells the two apart: one object's shape,
    colour or size; a single object moved; or, with two objects, their colours swapped (binding) or the objects
    swapped (order). The training split holds such pairs side by side (images 2j and 2j+1) and train.py keeps
    each pair in one batch: then "a red circle left of a blue star" must find its image among images that have
    the same colours and shapes, which a bag of words cannot do (the image side of NegCLIP's hard negatives)."""
    twin = copy.deepcopy(scene)
    objs = twin["objects"]
    kinds = ["shape", "colour", "size"] + (["position"] if len(objs) == 1 else ["binding", "order"])
    kind = str(rng.choice(kinds))
    if kind == "binding" and objs[0]["colour"] == objs[1]["colour"]:
        kind = "order" if objs[0]["shape"] != objs[1]["shape"] else "shape"
    if kind in ("shape", "colour"):
        obj, other = (objs + objs)[int(rng.integers(len(objs))):][:2]
        values = [v for v in (SHAPES if kind == "shape" else COLOURS) if v != obj[kind] and
                  (len(objs) == 1 or {**obj, kind: v}["shape"] + {**obj, kind: v}["colour"]
                   != other["shape"] + other["colour"])]  # two objects never share both shape and colour
        obj[kind] = str(rng.choice(values))
        if kind == "shape":
            obj["angle"] = 0.0 if obj["shape"] == "circle" else round(rng.uniform(-15, 15), 1)
    elif kind == "size":
        obj = objs[int(rng.integers(len(objs)))]
        new = "small" if obj["size"] == "large" else "large"
        obj["radius"] = round(obj["radius"] * SIZES[new] / SIZES[obj["size"]], 4)
        obj["size"] = new
    elif kind == "position":
        obj = objs[0]
        new = str(rng.choice([p for p in SINGLE_POSITIONS if p != obj["position"]]))
        (x0, y0), (x1, y1) = SINGLE_POSITIONS[obj["position"]], SINGLE_POSITIONS[new]
        obj["center"] = [round(obj["center"][0] + x1 - x0, 4), round(obj["center"][1] + y1 - y0, 4)]  # same jitter
        obj["position"] = new
    elif kind == "binding":
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    else:  # order: the objects trade places (each slot keeps its position; what stands there is swapped)
        for key in ("shape", "colour", "size", "radius", "angle"):
            objs[0][key], objs[1][key] = objs[1][key], objs[0][key]
    twin["changed"] = kind  # kept in the JSON attributes
    return twin


def _stripe_mask(S, rng):
    y, x = _grid(S)
    a = rng.uniform(0, np.pi)
    return Image.fromarray((((np.cos(a) * x + np.sin(a) * y) / 0.07) % 1 < 0.5).astype(np.uint8) * 255)


def render(scene, style, rng, image_size=64):
    """Draw a scene at SUPERSAMPLE x resolution, then box-filter down to image_size."""
    S = image_size * SUPERSAMPLE
    img = Image.fromarray(style.backgrounds[scene["background"]](rng, S))
    for obj in scene["objects"]:
        colour = np.array(style.palette[obj["colour"]]) + rng.integers(-12, 13, 3)  # slight colour jitter
        colour = tuple(int(c) for c in np.clip(colour, 0, 255))
        (cx, cy), r, a = obj["center"], obj["radius"], math.radians(obj["angle"])
        points = [(S * (cx + r * (x * math.cos(a) - y * math.sin(a))),
                   S * (cy + r * (x * math.sin(a) + y * math.cos(a)))) for x, y in UNIT_SHAPES[obj["shape"]]]
        obj["fill"] = str(rng.choice(style.fills))  # recorded in the scene, so it lands in the JSON attributes
        mask = Image.new("L", (S, S), 0)
        if obj["fill"] == "outline":
            ImageDraw.Draw(mask).polygon(points, outline=255, width=int(2.5 * SUPERSAMPLE))
        else:
            ImageDraw.Draw(mask).polygon(points, fill=255)
        if obj["fill"] == "striped":  # darker stripes inside the shape
            img.paste(tuple(c // 2 for c in colour), mask=mask)
            mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(_stripe_mask(S, rng))))
        img.paste(colour, mask=mask)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if style.blur:
        img = img.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        pixels = np.asarray(img).astype(np.float32) + rng.normal(0, style.noise, (image_size, image_size, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img

# ----------------------------------------------------------------------------------------------------------
# Captions: five different templates per image, with a small fixed set of synonyms per attribute


COLOUR_WORDS = {"red": ["red", "scarlet"], "orange": ["orange"], "yellow": ["yellow", "golden"], "green": ["green"],
                "blue": ["blue"], "purple": ["purple", "violet"], "pink": ["pink"], "white": ["white"]}
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"],
               "star": ["star", "five-pointed star"], "heart": ["heart"], "cross": ["cross", "plus sign"],
               "diamond": ["diamond", "rhombus"], "hexagon": ["hexagon", "six-sided shape"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
BACKGROUND_WORDS = {"black": ["black", "plain black"], "gray": ["gray", "grey"], "gradient": ["gradient", "shaded"],
                    "striped": ["striped", "stripy"], "dotted": ["dotted", "polka-dot"],
                    "checkered": ["checkered", "checkerboard"]}  # other styles' background names are used as is
POSITION_WORDS = {"centre": ["in the centre", "in the middle", "at the center"],
                  "left": ["on the left", "to the left"], "right": ["on the right", "to the right"],
                  "top": ["at the top", "near the top"], "bottom": ["at the bottom", "near the bottom"]}
RELATION_WORDS = {"horizontal": (["to the left of", "left of"], ["to the right of", "right of"],
                                 ["side by side", "next to each other"]),
                  "vertical": (["above"], ["below", "under"], ["one above the other", "stacked vertically"])}

# {a}/{b}: "a red circle"; {as_}/{bs}: with a size word; {pa}/{pb}: where each object is; {bg}: "a striped backdrop"
SINGLE_TEMPLATES = [
    "{as_} on {bg}.", "{as_} {pa}.", "{pa}, {a} against {bg}.", "{bg} with {a} {pa}.",
    "there is {as_} {pa} on {bg}.", "a picture of {as_} on {bg}.",
    "one {size} {shape} coloured {colour}, {pa}, on {bg}.", "{bg} and {as_}.",
    "{a}, {size}, placed {pa} over {bg}.", "a single {colour} {shape} {pa}, on {bg}."]
PAIR_TEMPLATES = [
    "{a} {rel} {b} on {bg}.", "{b} {rel_rev} {a}, against {bg}.", "{a} and {b} {arr} on {bg}.",
    "two shapes on {bg}: {a} {pa} and {b} {pb}.", "{pa} is {a} and {pb} is {b}.", "{bg} with {as_} {rel} {bs}.",
    "{as_} {rel} {bs}.", "there are two objects, {b} and {a}, over {bg}.", "{a} together with {b} on {bg}.",
    "{as_} {pa} and {bs} {pb}, on {bg}."]  # the longest: at most 30 BPE tokens


def _article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_captions(scene, rng, n=5):
    """n captions from n different templates; each names every object's colour and shape."""
    pick = lambda words: str(rng.choice(words))
    objs = scene["objects"]
    templates = SINGLE_TEMPLATES if len(objs) == 1 else PAIR_TEMPLATES
    captions = []
    for t in rng.choice(len(templates), size=n, replace=False):
        o = [(pick(SIZE_WORDS[x["size"]]), pick(COLOUR_WORDS[x["colour"]]), pick(SHAPE_WORDS[x["shape"]]))
             for x in objs]  # (size, colour, shape) words of each object
        f = {"a": _article(f"{o[0][1]} {o[0][2]}"), "as_": _article(" ".join(o[0])),
             "size": o[0][0], "colour": o[0][1], "shape": o[0][2], "pa": pick(POSITION_WORDS[objs[0]["position"]]),
             "bg": _article(f"{pick(BACKGROUND_WORDS.get(scene['background'], [scene['background']]))} "
                            f"{pick(['background', 'backdrop'])}")}
        if len(objs) == 2:
            rel, rel_rev, arr = RELATION_WORDS[scene["layout"]]
            f.update(b=_article(f"{o[1][1]} {o[1][2]}"), bs=_article(" ".join(o[1])), rel=pick(rel),
                     rel_rev=pick(rel_rev), arr=pick(arr), pb=pick(POSITION_WORDS[objs[1]["position"]]))
        text = templates[t].format(**f)
        captions.append(text[0].upper() + text[1:])
    assert len(set(captions)) == n, captions  # different templates never give the same sentence
    return captions

# ----------------------------------------------------------------------------------------------------------
# Writing the dataset


def make_entry(index, split, seed, image_size, style_name, images_dir, minimal_pairs=False):
    """Draw image `index`, save its PNG, and return its Karpathy-format JSON entry. With minimal_pairs, an odd
    training image is the minimal_twin of the one before it."""
    style = STYLES[style_name]
    twin = minimal_pairs and split == "train" and index % 2 == 1
    scene = sample_scene(np.random.default_rng([seed, index - twin, 0]), list(style.backgrounds))
    if twin:
        scene = minimal_twin(scene, np.random.default_rng([seed, index, 3]))
    captions = make_captions(scene, np.random.default_rng([seed, index, 1]))
    image = render(scene, style, np.random.default_rng([seed, index, 2, list(STYLES).index(style_name)]), image_size)
    filename = f"{index:06d}.png"
    image.save(Path(images_dir) / filename)
    sentids = [5 * index + k for k in range(len(captions))]
    sentences = [{"raw": c, "tokens": re.findall(r"[a-z0-9]+", c.lower()), "imgid": index, "sentid": s}
                 for c, s in zip(captions, sentids)]
    return {"filename": filename, "imgid": index, "split": split, "sentids": sentids, "sentences": sentences,
            "attributes": dict(scene, style=style_name)}


def _make_entry_star(args):
    return make_entry(*args)


def dataset_params(seed, n_train, n_val, n_test, image_size, style, minimal_pairs):
    """What a dataset is made from, stored in its JSON (a cached dataset with other params is regenerated)."""
    params = dict(version=VERSION, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                  style=style)
    return params | ({"minimal_pairs": True} if minimal_pairs else {})  # absent: independent scenes, as before


def generate(root, seed=0, n_train=10000, n_val=1000, n_test=1000, image_size=64, style="default", workers=2,
             minimal_pairs=False):
    """Draw all images into root/images and write root/dataset_shapes.json last (atomically)."""
    root, params = Path(root), dataset_params(seed, n_train, n_val, n_test, image_size, style, minimal_pairs)
    assert style in STYLES, f"unknown style {style!r}; choose one of {list(STYLES)}"
    json_path, images_dir = root / JSON_NAME, root / "images"
    json_path.unlink(missing_ok=True)  # an interrupted run leaves no JSON, so it is redone next time
    images_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    jobs = [(i, split, seed, image_size, style, str(images_dir), minimal_pairs) for i, split in enumerate(splits)]
    bar = dict(total=len(jobs), desc=f"drawing {style} shapes into {root}", unit="img")
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            entries = list(tqdm(pool.imap(_make_entry_star, jobs, chunksize=64), **bar))
    else:
        entries = [make_entry(*job) for job in tqdm(jobs, **bar)]
    for f in images_dir.glob("*.png"):  # images left over from an earlier, larger dataset
        if re.fullmatch(r"\d{6}", f.stem) and int(f.stem) >= len(jobs):
            f.unlink()
    data = {"dataset": "shapes", "params": params, "images": entries}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, json_path)  # atomic: readers see either no JSON or a complete one
    return json_path


def ensure_shapes(root=None, seed=0, n_train=10000, n_val=1000, n_test=1000, image_size=64, style="default",
                  workers=2, minimal_pairs=False):
    """Path to root/dataset_shapes.json, generating it first unless it exists with the same parameters.
    root=None means data/shapes (data/shapes_<style> for other styles)."""
    root = Path(root) if root else DEFAULT_ROOT if style == "default" else DATA_DIR / f"shapes_{style}"
    params = dataset_params(seed, n_train, n_val, n_test, image_size, style, minimal_pairs)
    json_path = root / JSON_NAME
    if json_path.exists():
        try:
            if json.loads(json_path.read_text()).get("params") == params:
                return json_path
        except json.JSONDecodeError:
            pass
        print(f"{json_path} was made with other parameters (or is damaged); regenerating")
    return generate(root, seed, n_train, n_val, n_test, image_size, style, workers, minimal_pairs)


def attribute_key(attributes):
    """What distinguishes a scene, for counting distinct scenes: background plus the set of objects."""
    return attributes["background"], tuple(sorted((o["shape"], o["colour"], o["size"], o["position"])
                                                  for o in attributes["objects"]))


def describe(json_path):
    """Print split sizes, distinct scenes per split and caption lengths (in tokens if tokenizer.py is there)."""
    images = json.loads(Path(json_path).read_text())["images"]
    try:
        from tokenizer import count_tokens
        unit = "BPE tokens"
    except ImportError:
        count_tokens, unit = (lambda c: len(c.split())), "words"
    for split in ["train", "val", "test"]:
        part = [im for im in images if im["split"] == split]
        keys = Counter(attribute_key(im["attributes"]) for im in part)
        print(f"{split:5s}: {len(part)} images, {sum(len(im['sentences']) for im in part)} captions, "
              f"{len(keys)} distinct attribute tuples ({sum(v for v in keys.values() if v > 1)} images share theirs)")
    lengths = np.array([count_tokens(s["raw"]) for im in images for s in im["sentences"]])
    print(f"caption length in {unit}: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    caps = Counter(s["raw"] for im in images for s in im["sentences"])
    print(f"{len(caps)} distinct captions out of {lengths.size} ({sum(v for v in caps.values() if v > 1)} "
          f"captions also describe another image)")


def save_preview(json_path, out, n=10, split="test", scale=3):
    """Save a grid PNG: n images of a split, enlarged, each next to its captions."""
    json_path = Path(json_path)
    images = [im for im in json.loads(json_path.read_text())["images"] if im["split"] == split][:n]
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    side = Image.open(json_path.parent / "images" / images[0]["filename"]).width * scale
    row = max(side, 6 * 17) + 8
    width = side + 20 + max(int(font.getlength(s["raw"])) for im in images for s in im["sentences"])
    sheet = Image.new("RGB", (width, row * len(images)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        pic = Image.open(json_path.parent / "images" / im["filename"]).convert("RGB")
        sheet.paste(pic.resize((side, side), Image.Resampling.NEAREST), (4, k * row + 4))
        lines = [im["filename"]] + [s["raw"] for s in im["sentences"]]
        for j, line in enumerate(lines):
            draw.text((side + 12, k * row + 4 + 17 * j), line, fill="gray" if j == 0 else "black", font=font)
    sheet.save(out)
    print(f"saved preview of {len(images)} {split} images to {out}")


def ensure_fewshot_shapes(root=None, label="shape", n_train=640, n_val=160, n_test=960, seed=1):
    """The built-in few-shot classification task of adapters.py: an ImageFolder (ROOT/{train,val,test}/<class>/*.png)
    of the single-object images of the *shifted* style (other shades of the colour words, textured backgrounds,
    outlined/striped fills, noise: nothing the default pretraining saw), one class per value of `label` ("shape" or
    "colour", 8 classes each). Made once from ensure_shapes and cached under data/shapes_fewshot_<label>.
    The shape of an outlined, striped or noisy object is the harder transfer: the default model learnt shape from
    solid shapes on six plain or patterned backgrounds. (The task was colour while the default model did not encode
    shape at all: a shape task then left every frozen-feature method at chance.)"""
    root = Path(root) if root else DATA_DIR / f"shapes_fewshot_{label}"
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Generate the Shapes caption dataset (Karpathy JSON layout).")
    parser.add_argument("--root", default=None, help="output folder (default: data/shapes, or data/shapes_<style>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--style", default="default", choices=list(STYLES))
    parser.add_argument("--workers", type=int, default=2, help="processes drawing images")
    parser.add_argument("--minimal-pairs", action="store_true",
                        help="training image 2j+1 is image 2j with one thing changed (default: independent scenes)")
    parser.add_argument("--preview", default=None, help="also save a grid of test images with captions here")
    args = parser.parse_args()
    path = ensure_shapes(args.root, args.seed, args.n_train, args.n_val, args.n_test, args.image_size, args.style,
                         args.workers, args.minimal_pairs)
    print(f"dataset: {path}")
    describe(path)
    if args.preview:
        save_preview(path, args.preview)
