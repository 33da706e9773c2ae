"""
Image-caption data: read caption files, check the images, and serve (image, tokens) pairs to training and evaluation.

Caption files (the format is detected from the content, not the file name):
  - Karpathy JSON, as in dataset_flickr30k.json / dataset_coco.json / dataset_flickr8k.json
    (https://cs.stanford.edu/people/karpathy/deepimagesent/) and our synthetic dataset_shapes.json
  - Flickr8k's Flickr8k.token.txt, with the split lists Flickr_8k.{train,dev,test}Images.txt beside it
  - a JSON list [{"image": "path", "caption": ["...", ...]}], as in the Flickr8k CLIP tutorial
  - a CSV file with a header row "image,caption" and one row per caption (Kaggle's Flickr8k captions.txt)

Training sees ONE caption per image per epoch, drawn afresh each epoch (the CLIP paper trains on image-text pairs;
with 5 captions per image this is the usual way to use all of them, as in open_clip's CsvDataset with multiple
captions). Evaluation encodes every image once and every caption once, and scores a retrieval as correct
when it finds any of the image's captions (the CLIP paper's zero-shot Flickr30k/COCO retrieval protocol).

Reproducibility: everything random about sample i in epoch e (its caption and its augmentation) is a pure function
of (seed, e, i). So a run resumed mid-epoch, or run with a different number of DataLoader workers, sees exactly
the same batches.
"""

import csv
import io
import json
import os
import random
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from tokenizer import count_tokens, tokenize
from transform import ImageLoadError, load_image

FORMATS = """Accepted caption files:
  - Karpathy JSON: {"images": [{"filename": ..., "split": ..., "sentences": [{"raw": ...}, ...]}, ...]}
  - Flickr8k.token.txt: lines "<image>.jpg#<n><TAB><caption>" (splits from Flickr_8k.{train,dev,test}Images.txt)
  - JSON list: [{"image": "path", "caption": ["...", ...]}, ...]  (optional "split" per entry)
  - CSV with the header "image,caption" (optional "split" column), one row per caption"""


class Record(NamedTuple):
    image: str  # image path relative to the image root, with "/" separators
    captions: list  # every caption of this image


# ----------------------------------------------------------------------------------------------------------
# Reading caption files. Each reader returns rows (image, [captions], split or None).


def _karpathy(data):
    rows = []
    for im in data["images"]:
        image = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]  # COCO: val2014/x.jpg
        split = "train" if im.get("split") == "restval" else im.get("split")  # COCO's restval is extra training data
        rows.append((image, [s["raw"] for s in im["sentences"]], split))
    return rows


def _tutorial_list(data):
    return [(im["image"], list(im["caption"]) if isinstance(im["caption"], list) else [im["caption"]], im.get("split"))
            for im in data]  # "caption" is one caption or a list of them; _check_rows refuses any that is not text


def _flickr8k(path, text):
    captions = {}  # image -> captions, in first-seen order (dicts keep insertion order)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if "\t" not in line or "#" not in line.split("\t")[0]:
                raise ValueError(f"{path}, line {n}: expected '<image>#<n><TAB><caption>', got {line[:80]!r}")
            name, caption = line.split("\t", 1)
            captions.setdefault(name.rsplit("#", 1)[0], []).append(caption.strip())
    split_of = {}  # official split lists; images in none of them (e.g. the stray "...jpg.1") get no split
    for split, tag in [("train", "train"), ("val", "dev"), ("test", "test")]:
        list_file = path.parent / f"Flickr_8k.{tag}Images.txt"
        if list_file.exists():
            split_of.update((name, split) for name in list_file.read_text().split())
    return [(image, caps, split_of.get(image)) for image, caps in captions.items()]


def _csv(path, text):
    rows = csv.reader(io.StringIO(text))  # the csv module handles quoted captions with commas and "" quotes
    header = [h.strip().lower() for h in next(rows)]
    col = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
    grouped = {}  # (image, split) -> captions, in first-seen order
    for n, row in enumerate(rows, 2):
        if row:
            if len(row) != len(header):
                raise ValueError(f"{path}, row {n}: {len(row)} fields, the header has {len(header)} (unquoted comma?)")
            image, split = row[col["image"]].strip(), row[col["split"]] if "split" in col else None
            grouped.setdefault((image, split), []).append(row[col["caption"]].strip())  # two splits: refused later
    return [(image, caps, split) for (image, split), caps in grouped.items()]


def _read_text(path):
    """The caption file's text, or one clear error for a folder, a missing file or a binary file."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".json", ".txt", ".csv"))
        raise ValueError(f"{path} is a directory: pass the caption file (a .json, .txt or .csv file; "
                         + (f"in this folder: {', '.join(inside[:5])})" if inside else "there is none in this folder)"))
    if not path.exists():
        raise FileNotFoundError(f"caption file {path} not found")
    try:
        return path.read_text(encoding="utf-8-sig")  # utf-8-sig: drops the byte-order mark that spreadsheets write
    except UnicodeDecodeError as e:  # an image or an archive passed by mistake, or a file saved in another encoding
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): pass the caption file, saved as UTF-8") from None


def _check_rows(path, rows):
    """Every entry needs an image name and at least one caption, all text: name the first entry that has not.
    An image without a caption can be neither trained on nor retrieved."""
    for n, (image, captions, _) in enumerate(rows, 1):
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{path}, entry {n}: the image name is {image!r:.60}: give every entry its image's path")
        if not captions:
            raise ValueError(f"{path}: image {image!r} has no captions: add at least one, or remove the entry")
        for caption in captions:
            if not isinstance(caption, str):
                raise ValueError(f"{path}: image {image!r} has the caption {caption!r:.60}, which is not text: "
                                 "write each caption as a string in quotes")


def _merge_duplicates(path, rows):
    """One row per image, in first-seen order. An image listed twice would count as two images in retrieval (each
    copy's captions miss the other copy), so its captions are merged, in file order, with one warning line."""
    merged = {}  # image -> [captions, split]
    for image, captions, split in rows:
        if image not in merged:
            merged[image] = [list(captions), split]
        elif merged[image][1] != split:
            raise ValueError(f"{path}: image {image!r} is listed in split {merged[image][1]!r} and in split {split!r} "
                             "(a test image seen in training inflates recall): keep it in one split")
        else:
            merged[image][0].extend(captions)
    if len(merged) < len(rows):
        repeated = [image for image, n in Counter(image for image, *_ in rows).items() if n > 1]
        warnings.warn(f"{path}: {len(repeated)} image{' is' if len(repeated) == 1 else 's are'} listed more than once "
                      f"({', '.join(repeated[:5])}{', ...' if len(repeated) > 5 else ''}): each now has one entry "
                      "with all its captions, in file order")
    return [(image, captions, split) for image, (captions, split) in merged.items()]


def read_captions(path, split=None):
    """Read a caption file -> [Record(image, captions)], all images or those of one split (train/val/test).
    One Record per image (an image listed twice is merged, with a warning); an entry without captions, or with a
    caption that is not text, is refused with its name."""
    path = Path(path)
    text = _read_text(path)
    first_line = text.lstrip().split("\n", 1)[0].strip()
    try:
        if first_line[:1] in ("{", "["):
            data = json.loads(text)
            if isinstance(data, dict) and "images" in data:
                rows = _karpathy(data)
            elif isinstance(data, list) and all(isinstance(d, dict) and "image" in d and "caption" in d for d in data):
                rows = _tutorial_list(data)
            else:
                raise ValueError("JSON, but neither a Karpathy file nor an image/caption list")
        elif re.match(r"[^\t]+#\d+\t", first_line):
            rows = _flickr8k(path, text)
        elif {"image", "caption"} <= {h.strip().lower() for h in next(csv.reader([first_line]), [])}:
            rows = _csv(path, text)
        else:
            raise ValueError("unrecognised content")
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"Cannot read caption file {path}: {type(e).__name__}: {e}\n{FORMATS}") from e
    _check_rows(path, rows)
    rows = [(image.replace("\\", "/"), caps, s) for image, caps, s in rows]  # Windows paths in tutorial files
    rows = _merge_duplicates(path, rows)
    if split is None:
        return [Record(image, caps) for image, caps, _ in rows]
    available = sorted({s for *_, s in rows if s is not None})
    if not available:
        raise ValueError(f"{path} has no split information, so split={split!r} cannot be selected. Use every entry "
                         f"({len(rows)} images: split=None, or --train-split '' / --split '' on the command line), "
                         "or add a split (a 'split' field or column; for Flickr8k, "
                         "the Flickr_8k.{train,dev,test}Images.txt lists next to the file).")
    if split not in available:
        raise ValueError(f"{path} has no split {split!r}; its splits are: {', '.join(available)}")
    return [Record(image, caps) for image, caps, s in rows if s == split]


def _outside(records, root):
    """The image paths that lead out of the image root: "../x.png", "/etc/passwd". Checked on the path's text, with
    ".." resolved, so a symlink inside the root (a common way to share a dataset) still counts as inside."""
    tops = [os.path.normpath(root.absolute()), str(root.resolve())]  # an absolute path in the file may name either
    outside = []
    for r in records:
        path = os.path.normpath(root.absolute() / r.image)  # joining an absolute path gives that path
        if not any(os.path.commonpath([path, top]) == top for top in tops):
            outside.append(r.image)
    return outside


def _unreadable(records, root):
    """The images whose header is not an image's (an HTML error page, an empty file): opening a file reads only its
    header, so this is fast; a file truncated later on is found only when decoded."""
    bad = []
    for r in records:
        try:
            with Image.open(root / r.image):
                pass
        except Image.UnidentifiedImageError:
            bad.append(f"{r.image} (not a recognised image format)")
        except (OSError, SyntaxError, ValueError) as e:
            bad.append(f"{r.image} ({type(e).__name__}: {e})")
    return bad


def check_images(records, image_root, open_files=False):
    """Fail before the work starts if any image path leads outside the image root or names a missing file, or,
    with open_files, is not an image; name the first few and the root used."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image root {root.resolve()} is not a folder: pass the folder that the caption "
                                "file's image paths start from.")
    outside = _outside(records, root)
    if outside:
        raise ValueError(f"{len(outside)} of {len(records)} image paths lead outside the image root {root.resolve()}, "
                         f"for example: {', '.join(outside[:5])}. A caption file's image paths must be relative to "
                         "the image root (--images): fix them, or pass the folder they start from.")
    missing = [r.image for r in records if not (root / r.image).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(records)} images are missing under the image root "
                                f"{root.resolve()}, for example: {', '.join(missing[:5])}. Check --images (the folder "
                                "the caption file's paths start from) and the paths in the caption file.")
    unreadable = _unreadable(records, root) if open_files else []
    if unreadable:
        raise ImageLoadError(f"{len(unreadable)} of {len(records)} images cannot be read under the image root "
                             f"{root.resolve()}, for example: {', '.join(unreadable[:5])}. Replace those files, "
                             "or remove their entries from the caption file.")


def count_truncated(records, context_length=77):
    """How many captions are longer than context_length - 2 tokens (room for SOT and EOT) and will be cut."""
    return sum(count_tokens(c) > context_length - 2 for r in records for c in r.captions)


# ----------------------------------------------------------------------------------------------------------
# Datasets


def sample_rng(seed, epoch, index):
    """A random.Random that depends only on (seed, epoch, index): not on the worker, the order or the history.
    A str seed is hashed with SHA-512, so it is the same in every process and Python version."""
    return random.Random(f"{seed}/{epoch}/{index}")


class BadSample(NamedTuple):
    """Returned instead of (image, tokens) when an image cannot be read; collate_skip_bad drops it."""
    path: str
    error: str


class CaptionTrainDataset(Dataset):
    """Image i with one of its captions, drawn afresh each epoch -> (image (3, H, W), tokens (context_length,)).
    transform takes the decoded image as a uint8 (3, H, W) tensor (transform.train_augment). cache=True keeps every
    decoded image in memory after its first use (for a small dataset: Shapes' 10,000 images take 123 MB), so later
    epochs skip the PNG decoding. With negatives, a function (caption, k, numpy rng) -> up to k hard-negative captions
    (negatives.sample_negatives), tokens are (1 + k, context_length): the caption, then its negatives (all-zero rows
    where there are fewer)."""

    def __init__(self, records, image_root, transform, context_length=77, seed=0, negatives=None, k=0, cache=False):
        self.records, self.image_root, self.transform = records, Path(image_root), transform
        self.context_length, self.seed, self.epoch = context_length, seed, 0
        self.negatives, self.k = negatives, k
        self.cache = {} if cache else None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def decoded(self, i):
        """Image i as a uint8 (3, H, W) RGB tensor, from the cache when it holds it."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image = torch.from_numpy(np.array(load_image(self.image_root / self.records[i].image))).permute(2, 0, 1)
        if self.cache is not None:
            self.cache[i] = image
        return image

    def __getitem__(self, key):
        # key is an index, or an (epoch, index) pair from EpochSampler. DataLoader workers hold their own copy of
        # the dataset (kept across epochs with persistent_workers), so set_epoch() on the main process's copy would
        # not reach them; the sampler runs in the main process and hands the epoch to the workers with each index.
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rng = sample_rng(self.seed, epoch, i)
        caption = rng.choice(self.records[i].captions)
        try:
            image = self.decoded(i)
        except ImageLoadError as e:  # a bad file must not kill a long run: mark it, collate_skip_bad drops it
            return BadSample(str(self.image_root / self.records[i].image), str(e))
        return training_sample(image, caption, rng, self.transform, self.context_length, self.negatives, self.k)


def training_sample(image, caption, rng, transform, context_length, negatives=None, k=0):
    """A decoded uint8 (3, H, W) image and its caption -> (pixels, tokens): the augmentation under a torch RNG seeded
    from rng (a random.Random), and the caption's tokens (L,), or with negatives the caption and its up to k
    hard-negative captions (1 + k, L), all-zero rows where there are fewer (shards.ShardStream makes its samples
    with it too)."""
    with torch.random.fork_rng(devices=[]):  # the augmentation's torch RNG, seeded per sample, then restored
        torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU generator only: torch.manual_seed
        # also queues a seed for every GPU backend, with a stack trace each time (~1 ms per image)
        pixels = transform(image)
    if negatives is None:
        return pixels, tokenize(caption, context_length, truncate=True)[0]  # (L,)
    found = negatives(caption, k, np.random.default_rng(rng.getrandbits(63)))
    tokens = torch.zeros(1 + k, context_length, dtype=torch.long)  # (1 + k, L)
    tokens[:1 + len(found)] = tokenize([caption] + found, context_length, truncate=True)
    return pixels, tokens


def collate_skip_bad(batch):
    """Stack the good samples -> (images (B, 3, H, W), tokens (B, L), bad_paths); B may be below batch_size, even 0."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad_paths = [b.path for b in batch if isinstance(b, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad_paths
    images, tokens = default_collate(good)
    return images, tokens, bad_paths


class CaptionEvalDataset(Dataset):
    """Every image once, as (image (3, H, W), image index), plus every caption once in .captions, with the index of
    its image in .caption_image. captions_per_image=1 keeps only the first caption (the tutorial's protocol)."""

    def __init__(self, records, image_root, transform, captions_per_image=None):
        assert captions_per_image in (None, 1), "captions_per_image is None (all captions) or 1 (the first)"
        self.records, self.image_root, self.transform = records, Path(image_root), transform
        self.captions = [c for r in records for c in r.captions[:captions_per_image]]
        self.caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions[:captions_per_image]],
                                          dtype=torch.long)  # (num_captions,)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        # No skipping here: a missing image would shift every index after it. ImageLoadError names the file.
        return self.transform(load_image(self.image_root / self.records[i].image)), i


# ----------------------------------------------------------------------------------------------------------
# Sampling and loading


class EpochSampler(Sampler):
    """A shuffled order that is a pure function of (seed, epoch), which can start part-way through an epoch.

    Yields (epoch, index) pairs, see CaptionTrainDataset.__getitem__. To resume after k batches of an epoch,
    set_epoch(epoch, start=k * batch_size): with drop_last=True, batches are consecutive slices of the order,
    so the remaining batches are exactly those an uninterrupted run would have seen. group > 1 shuffles groups of
    that many consecutive indices and keeps each group together (minimal pairs: group=2 with an even batch size)."""

    def __init__(self, n, seed=0, shuffle=True, group=1):
        self.n, self.seed, self.shuffle, self.group = n, seed, shuffle, group
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def order(self):
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(sample_rng(self.seed, self.epoch, "order").getrandbits(63))
        groups = torch.randperm(-(-self.n // self.group), generator=g).tolist()
        return [i for k in groups for i in range(k * self.group, min(self.n, (k + 1) * self.group))]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.order()[self.start:]])

    def __len__(self):
        return max(self.n - self.start, 0)


def minimal_pair_group(data, records, batch_size):
    """2 when the training split is the built-in Shapes data made of minimal pairs (synthetic.minimal_twin: image
    2j+1 is image 2j with one thing changed), so the sampler keeps each pair in one batch; 1 otherwise."""
    if Path(data).name != "dataset_shapes.json" or batch_size % 2:
        return 1
    params = json.loads(Path(data).read_text()).get("params", {})
    if not params.get("minimal_pairs") or len(records) != params.get("n_train"):
        return 1
    print("data: minimal pairs (image 2j+1 is image 2j with one thing changed): each pair stays in one batch")
    return 2


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


def make_loader(dataset, batch_size, train, seed=0, workers=0, device="cpu", drop_last=True,
                collate_fn=collate_skip_bad):
    """The DataLoader settings we use.

    train=True: EpochSampler order (call loader.sampler.set_epoch(epoch, start) before each epoch); by default
    drop_last, so every step has batch_size pairs (the contrastive loss has a fixed number of negatives), and
    collate_skip_bad, so batches are (images, tokens, bad_paths). train=False: dataset order, every sample, the
    default collate. Both: pin_memory on CUDA (faster host-to-GPU copies), persistent workers (no restart cost)."""
    common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                  pin_memory=torch.device(device).type == "cuda")
    if train:
        return DataLoader(dataset, sampler=EpochSampler(len(dataset), seed), drop_last=drop_last,
                          collate_fn=collate_fn, **common)
    return DataLoader(dataset, shuffle=False, **common)
