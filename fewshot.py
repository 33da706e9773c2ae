"""
Few-shot data for the adapters (adapters.py): ImageFolder directories, the seeded K-shot train/val sampling saved to
JSON, the test split read once, Tip-Adapter's augmented views, and the frozen encoder's features cached per
(file, view) in memory and on disk.

Protocol: CoOp's (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", section 4.1; CoOp's
datasets/oxford_pets.py generate_fewshot_dataset): K training images per class and min(K, 4) validation images per
class, drawn with the seed. Augmentation: Tip-Adapter's (Zhang et al. 2022; Tip-Adapter main.py build_cache_model):
RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip, 10 views per image.
"""
import json
import random
import zlib
from pathlib import Path

import torch
from torchvision.transforms import (Compose, InterpolationMode, Normalize, RandomHorizontalFlip, RandomResizedCrop,
                                    ToTensor)

from tokenizer import tokenize
from transform import IMAGE_EXTENSIONS, OPENAI_MEAN, OPENAI_STD, image_transform, load_image

# ----------------------------------------------------------------------------------------------------------------
# ImageFolder directories, seeded K-shot sampling saved to JSON, the test split read once


def list_class_folders(folder):
    """{class name: sorted image paths} for a folder of class folders."""
    classes = sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(str(p) for p in (Path(folder) / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            for c in classes}


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
    """The one place that lists a split's images: {class: [paths]}. Test is listed only by read_test(), at the end."""
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
    split = dict(root=str(root), shots=shots, seed=seed, classes=classes, train=train_items, val=val_items)
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

