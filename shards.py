"""
Training from tar shards: webdataset's layout (https://github.com/webdataset/webdataset), which is what img2dataset
(https://github.com/rom1504/img2dataset) writes for LAION/CC3M-sized data: files shards-000000.tar ...
shards-000099.tar, each holding per sample KEY.jpg (or .png/.jpeg/.webp) and KEY.txt (the caption, UTF-8), the
members of one sample next to each other; other members (KEY.json, ...) are ignored.

    python shards.py data/shapes/dataset_shapes.json --images data/shapes/images --out data/shapes_tar
    python train.py --data 'data/shapes_tar/shards-{000000..000009}.tar' ...    # the pattern printed above

We read the tars with Python's tarfile module rather than the webdataset library: no extra dependency, and resuming
a run exactly at the sample it stopped at is simpler to guarantee with our own deterministic order. That order:
each epoch the shards are shuffled with (seed, epoch) and dealt to the streams (one per DataLoader worker of each
process), and each stream passes its samples through a seeded shuffle buffer. Everything random about a sample
(its augmentation, its hard negatives) is a pure function of (seed, epoch, shard file name, sample key), as in
data.CaptionTrainDataset; the batches also depend on the number of processes and workers (keep them when resuming).
"""

import argparse
import glob
import io
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from data import BadSample, check_images, collate_skip_bad, read_captions, sample_rng, training_sample
from runtime import error_line, int_at_least
from transform import ImageLoadError, load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes (--output_format, --encode_format)
EXAMPLE = "shards-{000000..000099}.tar"

# ----------------------------------------------------------------------------------------------------------
# Finding the shards


def expand_braces(spec):
    """'a-{00..02}.tar' -> ['a-00.tar', 'a-01.tar', 'a-02.tar'], zero padding kept as braceexpand does; several
    ranges multiply. A spec without a range is returned as it is."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match is None:
        return [spec]
    lo, hi = match.groups()
    padded = (len(lo) > 1 and lo[0] == "0") or (len(hi) > 1 and hi[0] == "0")
    width = max(len(lo), len(hi)) if padded else 1
    head, tail = spec[:match.start()], spec[match.end():]
    return [head + str(i).zfill(width) + rest for i in range(int(lo), int(hi) + 1) for rest in expand_braces(tail)]


def expand_shards(spec):
    """The shard files of a spec: a brace range (shards-{000000..000099}.tar), a folder (its .tar files, sorted) or a
    glob (shards-*.tar) -> [Path]. A missing file or an empty result is a ValueError that names it."""
    paths = []
    for part in expand_braces(str(spec)):
        if Path(part).is_dir():
            paths += sorted(Path(part).glob("*.tar"))
        elif any(c in part for c in "*?["):
            paths += sorted(Path(p) for p in glob.glob(part))
        elif not Path(part).is_file():
            raise ValueError(f"shard {part} not found (from {spec}): check the folder and the range, e.g. {EXAMPLE}")
        else:
            paths.append(Path(part))
    if not paths:
        raise ValueError(f"{spec} matches no .tar file: pass a brace range ({EXAMPLE}), a folder of shards or a glob")
    return paths


def is_shards(spec):
    """True when --data names tar shards (a spec ending in .tar, or a folder holding .tar files), not a caption file."""
    if Path(spec).is_dir():
        return any(Path(spec).glob("*.tar"))
    return all(part.lower().endswith(".tar") for part in expand_braces(str(spec)))


# ----------------------------------------------------------------------------------------------------------
# Reading one shard


def split_name(name):
    """'dir/000000123.jpg' -> ('dir/000000123', 'jpg'): webdataset's rule, the key ends at the first dot of the
    file name."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def read_samples(path, read=True):
    """Yield (key, image extension, image bytes, caption) for each sample of one shard, in file order: a key with an
    image member and a .txt member (the first image, if it has several). read=False reads no data (tarfile seeks
    over it) and yields TarInfo headers in place of the bytes and the caption."""
    with tarfile.open(path) as tar:
        for key, parts in members_by_key(tar, read):
            images = [ext for ext in parts if ext != "txt"]
            if images and "txt" in parts:
                caption = parts["txt"].decode("utf-8", errors="replace").strip() if read else parts["txt"]
                yield key, images[0], parts[images[0]], caption


def members_by_key(tar, read):
    """Yield (key, {extension: bytes, or TarInfo when not read}) for each run of members with one key: images, .txt."""
    key, parts = None, {}
    for member in tar:
        member_key, ext = split_name(member.name)
        if member_key != key:
            if parts:
                yield key, parts
            key, parts = member_key, {}
        if member.isfile() and ext in IMAGE_EXTENSIONS + ("txt",) and ext not in parts:
            parts[ext] = tar.extractfile(member).read() if read else member
    if parts:
        yield key, parts


def count_samples(path):
    """The number of samples in one shard, from the tar headers only."""
    try:
        return sum(1 for _ in read_samples(path, read=False))
    except tarfile.TarError as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e}): replace it, or leave it out") from e


# ----------------------------------------------------------------------------------------------------------
# The training stream


class ShardStream(torch.utils.data.IterableDataset):
    """This process's training batches -> (images (B, 3, H, W), tokens (B, L) or (B, 1 + k, L), unreadable paths)
    (data.collate_skip_bad). Use: DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False).
    There are world * max(workers, 1) streams, stream s = rank * max(workers, 1) + worker; each epoch, shard j of the
    shuffled order goes to stream j % streams. Every stream yields the same number of full batches in every epoch:
    as many as the fewest samples a stream can get allow (its share of shards, the smallest ones), so all processes
    take the same number of steps; `used_share` is the share of all samples that an epoch uses."""

    def __init__(self, paths, batch_size, rank, world, workers, transform, context_length=77, seed=0,
                 negatives=None, k=0, buffer=1000):
        self.paths, self.batch_size, self.rank, self.world = [Path(p) for p in paths], batch_size, rank, world
        self.workers, self.transform, self.context_length, self.seed = workers, transform, context_length, seed
        self.negatives, self.k, self.buffer = negatives, k, buffer
        self.epoch, self.start = 0, 0
        self.counts = [count_samples(p) for p in self.paths]  # samples per shard
        self.streams = world * max(workers, 1)
        fewest = sum(sorted(self.counts)[:len(self.paths) // self.streams])  # fewest samples a stream can get
        self.batches = fewest // batch_size  # full batches each stream yields per epoch
        if self.batches == 0:
            raise ValueError(f"{sum(self.counts)} samples in {len(self.paths)} shards for {self.streams} streams "
                             f"({world} process(es) x {max(workers, 1)} worker(s)) leave some stream {fewest} "
                             f"samples, fewer than one batch of {batch_size}: use fewer workers or processes, "
                             "a smaller batch, or more shards")
        self.used_share = self.batches * batch_size * self.streams / sum(self.counts)

    def set_epoch(self, epoch, start=0):
        """As data.EpochSampler.set_epoch: start = samples of all processes (batch_size * world * steps) already
        used in this epoch. Reaches the workers at the next iter(), as they are not persistent."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        return max(self.workers, 1) * self.batches  # steps per epoch

    def shard_order(self, epoch):
        """The shard indices in this epoch's order, a pure function of (seed, epoch)."""
        order = list(range(len(self.paths)))
        sample_rng(self.seed, epoch, "shards").shuffle(order)
        return order

    def shuffled(self, epoch, stream):
        """Yield (shard path, key, extension, image bytes, caption) of one stream: its shards in the epoch's order,
        through a shuffle buffer seeded by (seed, epoch, stream). Bytes only: nothing is decoded here."""
        order = self.shard_order(epoch)
        mine = [self.paths[j] for position, j in enumerate(order) if position % self.streams == stream]
        rng = sample_rng(self.seed, epoch, f"buffer/{stream}")
        buffer = []
        for path in mine:
            for sample in read_samples(path):
                buffer.append((path, *sample))
                if len(buffer) >= self.buffer:  # full: a random one leaves
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def sample(self, epoch, path, key, ext, data, caption):
        """One sample, as data.CaptionTrainDataset.__getitem__ makes it -> (image (3, H, W), tokens), or BadSample."""
        rng = sample_rng(self.seed, epoch, f"{path.name}/{key}")
        where, file = f"{path}:{key}.{ext}", io.BytesIO(data)
        try:
            image = torch.from_numpy(np.array(load_image(file))).permute(2, 0, 1)  # (3, H, W) uint8
        except ImageLoadError as e:  # marked, and dropped by collate_skip_bad
            return BadSample(where, str(e).replace(str(file), where))
        return training_sample(image, caption, rng, self.transform, self.context_length, self.negatives, self.k)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        running = info.num_workers if info is not None else 0
        if running != self.workers:
            raise ValueError(f"this ShardStream was made for {self.workers} DataLoader workers, but runs with "
                             f"num_workers={running}: pass the same number to both")
        workers, worker = max(self.workers, 1), info.id if info is not None else 0
        taken = self.start // (self.batch_size * self.world)  # batches this process already took this epoch
        # The DataLoader takes batches from its workers in turn, starting with worker 0, so worker w serves batch
        # taken + w, taken + w + workers, ...: those of stream `role`, after skipping its first `skip` batches.
        role, skip = (taken + worker) % workers, (taken + worker) // workers
        samples = self.shuffled(self.epoch, self.rank * workers + role)
        for i in range(self.batches):
            raw = [next(samples) for _ in range(self.batch_size)]
            if i >= skip:  # skipped batches are read, never decoded
                yield collate_skip_bad([self.sample(self.epoch, *r) for r in raw])
        samples.close()


# ----------------------------------------------------------------------------------------------------------
# Writing shards


def write_shards(records, image_root, out_dir, per_shard=1000, prefix="shards"):
    """Write data.Records as tar shards prefix-000000.tar, ... in out_dir, per_shard samples each, in record order
    -> [Path]. One sample per image, keyed by its index (000000000, 000000001, ...), with ONE caption: the first
    (ShardStream trains on the .txt caption; the other captions of a 5-caption dataset are not written). The image
    file is copied as it is, so it must be a .jpg, .jpeg, .png or .webp file."""
    check_images(records, image_root)
    root, out = Path(image_root), Path(out_dir)
    other = [r.image for r in records if Path(r.image).suffix.lower()[1:] not in IMAGE_EXTENSIONS]
    if other:
        raise ValueError(f"{len(other)} images are not {', '.join(IMAGE_EXTENSIONS)} files, e.g. {other[0]}: "
                         "convert them first")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for first in range(0, len(records), per_shard):
        paths.append(out / f"{prefix}-{len(paths):06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for i, record in enumerate(records[first:first + per_shard], first):
                image = (root / record.image).read_bytes()
                for name, data in ((f"{i:09d}{Path(record.image).suffix.lower()}", image),
                                   (f"{i:09d}.txt", record.captions[0].encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644  # mtime 0: the same records give the same bytes
                    tar.addfile(info, io.BytesIO(data))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a caption file's images as tar shards for train.py --data.")
    parser.add_argument("captions", help="caption file (any format data.read_captions reads)")
    parser.add_argument("--images", required=True, help="the folder the caption file's image paths start from")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--split", default="train", help="the split to write ('' = every image)")
    parser.add_argument("--per-shard", type=int_at_least(1), default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    try:
        records = read_captions(args.captions, args.split or None)
        paths = write_shards(records, args.images, args.out, args.per_shard)
    except (FileNotFoundError, ValueError, OSError) as e:  # bad input: one line naming it
        sys.exit(f"error: {error_line(e)}")
    print(f"wrote {len(records)} samples (the first caption of each image) in {len(paths)} shards; train with "
          "--data and this, in quotes (the shell would expand the braces):")
    print(paths[0].parent / f"shards-{{000000..{len(paths) - 1:06d}}}.tar")  # the brace spec of the files written


if __name__ == "__main__":
    main()
