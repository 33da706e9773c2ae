"""
Few-shot data for the adapters (adapters.py): ImageFolder directories, the seeded K-shot train/val sampling saved to
JSON, the test split read once, Tip-Adapter's augmented views, the frozen encoder's features cached per
(file content, view) in memory and on disk, one cache file per checkpoint, and the Task a method sees.

Protocol: CoOp's (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", section 4.1; CoOp's
datasets/oxford_pets.py generate_fewshot_dataset): K training images per class and min(K, 4) validation images per
class, drawn with the seed. Augmentation: Tip-Adapter's (Zhang et al. 2022; Tip-Adapter main.py build_cache_model):
RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip, 10 views per image.
"""
import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import (Compose, InterpolationMode, Normalize, RandomHorizontalFlip, RandomResizedCrop,
                                    ToTensor)

from checkpoints import load_checkpoint
from model import CLIP
from runtime import autocast_context
from synthetic import ensure_fewshot_shapes
from templates import get_templates
from tokenizer import tokenize
from transform import IMAGE_EXTENSIONS, OPENAI_MEAN, OPENAI_STD, image_transform, load_image

# ----------------------------------------------------------------------------------------------------------------
# ImageFolder directories, seeded K-shot sampling saved to JSON, the test split read once


def data_root(data):
    """--data checked: an ImageFolder directory; None: the built-in few-shot task (synthetic.ensure_fewshot_shapes)."""
    if data is not None and Path(data).is_file():
        raise ValueError(f"--data {data} is a file: the adapters read an ImageFolder directory "
                         "(DIR/train/<class>/*.png, DIR/val, DIR/test; or DIR/<class>/*.png)")
    if data is not None and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory")
    return data or str(ensure_fewshot_shapes())


def task_templates(root, choice):
    """The zero-shot prompts of --templates: a named set or a file; "auto": ROOT/templates.txt if the dataset has its
    own (as CoOp and Tip-Adapter give each dataset one), else "single"."""
    auto = Path(root) / "templates.txt"
    return get_templates(choice if choice != "auto" else str(auto) if auto.exists() else "single")


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
            raise ValueError(f"{path} holds {split['shots']}-shot seed {split['seed']} of {split['root']}, not "
                             f"{shots}-shot seed {seed} of {root}: pass another --out (or --split-file), or delete it")
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
    """Raw (unnormalised) image features of the frozen encoder, per (file content, view); only missing ones are
    computed. The disk file is keyed by the checkpoint (load_bank), so another checkpoint never reads these features."""

    def __init__(self, model, device, ctx, cache_file=None, min_scale=0.5):
        self.model, self.device, self.ctx, self.cache_file = model, device, ctx, cache_file
        size = model.config.vision.image_size
        self.eval_tf, self.aug_tf = image_transform(size), augment_transform(size, min_scale)
        self.store = torch.load(cache_file, weights_only=True) if cache_file and Path(cache_file).exists() else {}
        self.digests = {}  # path -> hash of its bytes, read once per bank (one run, or one whole benchmark)

    def key(self, path, view):
        """The cache key of one view of one file: the view, the path and a hash of the file's bytes, so an image
        overwritten with another (even within the same mtime tick, with the same size) is encoded again."""
        if path not in self.digests:
            self.digests[path] = hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()
        return f"{view}:{path}:{self.digests[path]}"

    def get(self, paths, view=0):
        keys = [self.key(p, view) for p in paths]
        missing = [(p, k) for p, k in zip(paths, keys) if k not in self.store]
        for i in range(0, len(missing), 128):
            chunk = missing[i:i + 128]
            x = torch.stack([view_tensor(p, view, self.eval_tf, self.aug_tf) for p, _ in chunk]).to(self.device)
            with torch.no_grad(), self.ctx:
                features = self.model.encode_image(x).float().cpu()  # (b, D)
            self.store.update({k: f for (_, k), f in zip(chunk, features)})
        if missing and self.cache_file:
            Path(self.cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.store, self.cache_file)
        return torch.stack([self.store[k] for k in keys])  # (N, D)


def checkpoint_tag(path):
    st = Path(path).stat()
    return f"{Path(path).stem}-{zlib.crc32(f'{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()):08x}"


def load_bank(init, device, precision, cache_dir, min_scale):
    """The frozen CLIP of checkpoint `init` and its FeatureBank, whose disk file is keyed by the checkpoint file and
    the precision (bf16 features differ from fp32 ones in the third digit: the two are never mixed)."""
    model = load_checkpoint(init).to(device).eval().requires_grad_(False)
    cache_file = Path(cache_dir) / f"{checkpoint_tag(init)}-views{min_scale}-{precision}.pt"
    return FeatureBank(model, device, autocast_context(device, precision), cache_file, min_scale)


@torch.no_grad()
def template_features(model, classnames, templates, device):
    """Text embeddings of every (class, template) prompt -> (C, M, D), unnormalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenize(prompts, model.config.text.context_length).to(device)
    x = torch.cat([model.encode_text(tokens[i:i + 512]).float() for i in range(0, len(prompts), 512)])
    return x.view(len(classnames), len(templates), -1).cpu()

# ----------------------------------------------------------------------------------------------------------------
# The task a method sees (adapters.py): the split, the frozen model, its cached features and text embeddings


@dataclass
class Task:
    """A few-shot split as the frozen model sees it. Every method's logits function takes items [(path, label)]."""
    model: CLIP  # frozen, eval mode
    device: torch.device
    ctx: object  # autocast context (runtime.autocast_context)
    bank: FeatureBank
    classes: list
    train: list  # [(path, label)]
    val: list
    text: torch.Tensor  # (C, M, D) template embeddings of the zero-shot templates
    views: int = 10  # augmented views per training image (Tip-Adapter's augment_epoch)

    @property
    def temperature(self):
        """The frozen model's exp(logit_scale): ~18 for this project's default checkpoint, 100 for OpenAI's."""
        return self.model.logit_scale.exp().item()

    def labels(self, items):
        return torch.tensor([y for _, y in items])

    def features(self, items, view=0):
        return F.normalize(self.bank.get([p for p, _ in items], view), dim=-1)

    def raw_views(self):
        """The training set's augmented views as the encoder gives them, unnormalised: (A, N, D)."""
        return torch.stack([self.bank.get([p for p, _ in self.train], v) for v in range(1, self.views + 1)])

    def view_stack(self):
        """The training set's augmented views, each normalised: (A, N, D)."""
        return F.normalize(self.raw_views(), dim=-1)

    def on_features(self, head):
        """A head on normalised centre-crop features (N, D) -> (N, C) becomes a logits function on items."""
        return lambda items: head(self.features(items))


def build_task(bank, split, templates, views):
    """The Task of a few-shot split (make_few_shot) on the frozen model of `bank` (load_bank); templates: the zero-shot
    prompts."""
    names = [c.replace("_", " ") for c in split["classes"]]
    text = template_features(bank.model, names, templates, bank.device)
    return Task(bank.model, bank.device, bank.ctx, bank, names, [tuple(x) for x in split["train"]],
                [tuple(x) for x in split["val"]], text, views)


@torch.no_grad()
def encode_items(encoder, items, task):
    """Centre-crop features of `items` through a (possibly fine-tuned) image encoder -> (N, D) on the CPU."""
    tf, out = image_transform(task.model.config.vision.image_size), []
    for i in range(0, len(items), 128):
        x = torch.stack([tf(load_image(p)) for p, _ in items[i:i + 128]]).to(task.device)
        with task.ctx:
            out.append(encoder(x).float().cpu())
    return torch.cat(out)
