"""
Tests for shards.py: finding shards (brace ranges, folders, globs, clear errors), counting samples from the tar
headers, the split of an epoch over processes and workers (disjoint, equal lengths), determinism, resuming at
the exact batch (with and without DataLoader workers), skipping corrupt images, and writing shards (also by the CLI).
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import shards as shards_module
from data import Record
from shards import ShardStream, count_samples, expand_shards, is_shards, read_samples, write_shards
from tokenizer import decode, tokenize
from transform import load_image, train_augment

ROOT = Path(__file__).resolve().parent.parent
N, B = 60, 4  # images; batch size


def as_float(image):
    """A transform that keeps every pixel, so an image's first pixel (its index) says which image it is."""
    return image.float()


def with_noise(image):
    """as_float, with one pixel drawn from torch's RNG: the sample's augmentation."""
    image = image.float()
    image[1, 0, 0] = torch.rand(())
    return image


def one_negative(caption, k, rng):
    return [caption + " upside down"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N noisy 20x20 PNGs whose top-left pixel is (i, 100, 200), with the captions 'picture i', and the records."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for i in range(N):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        pixels[0, 0] = (i, 100, 200)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
        records.append(Record(f"{i:03d}.png", [f"picture {i}", f"another caption of {i}"]))
    return root, records


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory):
    """8 shards: 7 of 8 samples and one of 4, so the streams of an epoch get unequal numbers of samples."""
    return write_shards(images[1], images[0], tmp_path_factory.mktemp("shards"), per_shard=8)


def index_of(pixels):
    return int(pixels[0, 0, 0])  # (3, H, W): the red value of the top-left pixel


def worker_batches(paths, rank, world, workers, worker, epoch=0, start=0, monkeypatch=None, **kw):
    """The batches one worker of one process yields, run here with get_worker_info() faked."""
    stream = ShardStream(paths, B, rank, world, workers, kw.pop("transform", as_float), seed=kw.pop("seed", 3), **kw)
    stream.set_epoch(epoch, start)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    return list(stream)


# ----------------------------------------------------------------------------- finding and counting shards

def test_brace_range_folder_glob_and_clear_errors(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    (tmp_path / "s-7.tar").write_bytes(b"")
    names = lambda paths: [p.name for p in paths]
    assert names(expand_shards(f"{tmp_path}/s-{{000..002}}.tar")) == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert names(expand_shards(f"{tmp_path}/s-{{7..7}}.tar")) == ["s-7.tar"]  # no leading zero: no padding
    assert names(expand_shards(tmp_path)) == ["s-000.tar", "s-001.tar", "s-002.tar", "s-7.tar"]
    assert names(expand_shards(f"{tmp_path}/s-00*.tar")) == ["s-000.tar", "s-001.tar", "s-002.tar"]
    with pytest.raises(ValueError, match=r"shard .*s-003\.tar not found"):
        expand_shards(f"{tmp_path}/s-{{000..005}}.tar")
    with pytest.raises(ValueError, match=r"matches no \.tar file"):
        expand_shards(f"{tmp_path}/x-*.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty matches no"):
        expand_shards(tmp_path / "empty")
    assert is_shards(f"{tmp_path}/s-{{000..002}}.tar") and is_shards(tmp_path) and is_shards("x/*.tar")
    assert not is_shards(tmp_path / "empty") and not is_shards("data/shapes/dataset_shapes.json")


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_count_samples_needs_an_image_and_a_caption(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["0.jpg", "0.txt", "0.json", "1.txt", "2.png", "3.JPEG", "3.txt", "4.webp", "4.txt", "5.bmp",
                     "5.txt"]:
            add(tar, name, name.encode())  # 1: no image, 2: no caption, 5: not an image extension
    assert count_samples(path) == 3
    (tmp_path / "bad.tar").write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(ValueError, match=r"shard .*bad\.tar is not a readable tar file"):
        count_samples(tmp_path / "bad.tar")
    assert [(k, ext, data, caption) for k, ext, data, caption in read_samples(path)] == [
        ("0", "jpg", b"0.jpg", "0.txt"), ("3", "jpeg", b"3.JPEG", "3.txt"), ("4", "webp", b"4.webp", "4.txt")]


def test_write_shards_counts_and_contents(shards, images):
    assert [p.name for p in shards] == [f"shards-{i:06d}.tar" for i in range(8)]
    assert [count_samples(p) for p in shards] == [8] * 7 + [4]
    key, ext, data, caption = next(read_samples(shards[1]))
    assert (key, ext, caption) == ("000000008", "png", "picture 8")  # one caption: the first
    assert data == (images[0] / "008.png").read_bytes()


# ----------------------------------------------------------------------------- the split over processes and workers

def test_two_ranks_two_workers_get_disjoint_equal_shares_of_real_samples(shards, monkeypatch):
    seen, lengths = [], []
    for rank in (0, 1):
        stream = ShardStream(shards, B, rank, 2, 2, as_float)
        # streams get 2 shards: at least 4 + 8 samples, 3 batches of 4 each
        assert stream.batches == 3 and len(stream) == 6 and stream.used_share == pytest.approx(48 / 60)
        for worker in (0, 1):
            batches = worker_batches(shards, rank, 2, 2, worker, epoch=1, monkeypatch=monkeypatch)
            lengths.append(len(batches))
            for images, tokens, bad in batches:
                assert images.shape == (B, 3, 20, 20) and tokens.shape == (B, 77) and bad == []
                for pixels, row in zip(images, tokens):
                    seen.append(index_of(pixels))
                    assert torch.equal(row, tokenize(f"picture {index_of(pixels)}")[0])  # its own caption
    assert lengths == [3, 3, 3, 3]
    assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(N))


def test_a_samples_augmentation_depends_on_its_key_not_on_its_place(shards, monkeypatch):
    noise = lambda batches: {index_of(p): float(p[1, 0, 0]) for images, _, _ in batches for p in images}
    alone = noise(worker_batches(shards, 0, 1, 0, 0, epoch=1, monkeypatch=monkeypatch, transform=with_noise))
    split = {}
    for rank in (0, 1):
        for worker in (0, 1):
            split.update(noise(worker_batches(shards, rank, 2, 2, worker, epoch=1, monkeypatch=monkeypatch,
                                              transform=with_noise)))
    common = set(alone) & set(split)
    assert len(common) >= 30 and all(alone[i] == split[i] for i in common)
    assert len(set(alone.values())) == len(alone)  # and it does differ between samples


def test_too_few_samples_for_a_batch_per_stream(shards):
    with pytest.raises(ValueError, match=r"60 samples in 8 shards for 8 streams .* fewer workers"):
        ShardStream(shards, 8, 0, 4, 2, as_float)
    with pytest.raises(ValueError, match="leave some stream 0 samples"):
        ShardStream(shards[:3], B, 0, 2, 2, as_float)


def test_wrong_number_of_dataloader_workers_is_refused(shards):
    stream = ShardStream(shards, B, 0, 1, 2, as_float)
    with pytest.raises(ValueError, match="made for 2 DataLoader workers, but runs with num_workers=0"):
        next(iter(stream))


# ----------------------------------------------------------------------------- determinism and resuming

def keys(batches):
    return [index_of(pixels) for images, _, _ in batches for pixels in images]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_same_seed_same_batches_other_epoch_or_seed_other_order(shards, monkeypatch):
    run = lambda epoch, seed=3: worker_batches(shards, 0, 1, 0, 0, epoch, seed=seed, monkeypatch=monkeypatch,
                                               transform=train_augment(16))
    first = run(0)
    assert same_batches(first, run(0))
    assert not same_batches(first, run(1)) and not same_batches(first, run(0, seed=4))
    ids = lambda epoch, seed=3: keys(worker_batches(shards, 0, 1, 0, 0, epoch, seed=seed, monkeypatch=monkeypatch))
    assert ids(0) != ids(1) and ids(0) != ids(0, seed=4) and ids(0) == ids(0)
    assert len({i // 8 for i in ids(0)[:B]}) > 1  # the shuffle buffer mixes the shards (shard i // 8 holds i)
    shards_of = lambda epoch: {i // 8 for i in keys(worker_batches(shards, 0, 2, 2, 0, epoch, monkeypatch=monkeypatch))}
    assert shards_of(0) != shards_of(1)  # each epoch deals the shards to the streams anew


def test_resume_mid_epoch_without_workers_gives_the_remaining_batches(shards, monkeypatch):
    kw = dict(transform=train_augment(16), seed=5, negatives=one_negative, k=2, buffer=5)
    for rank in (0, 1):
        stream = ShardStream(shards, B, rank, 2, 0, **kw)  # 2 processes: one batch is 2 * B samples of the epoch
        stream.set_epoch(2)
        full = list(stream)
        assert len(full) == len(stream) == 7 and full[0][1].shape == (B, 3, 77)
        assert torch.equal(full[0][1][:, 1], tokenize([c + " upside down" for c in decoded_captions(full[0][1])]))
        assert not full[0][1][:, 2].any()  # fewer negatives than k: zero rows
        for k in (1, 4, 7):
            stream.set_epoch(2, start=k * B * 2)
            decoded = []
            monkeypatch.setattr(shards_module, "load_image", lambda f: decoded.append(f) or load_image(f))
            assert same_batches(list(stream), full[k:])
            assert len(decoded) == (7 - k) * B  # the skipped batches were read, not decoded


def decoded_captions(tokens):
    return [decode(row[0][1:int(row[0].argmax())]).strip() for row in tokens]  # between SOT and EOT (the largest id)


def test_resume_mid_epoch_with_two_dataloader_workers(shards):
    stream = ShardStream(shards, B, 1, 2, 2, train_augment(16), seed=5)
    loader = lambda: torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=False)
    stream.set_epoch(1)
    full = list(loader())
    assert len(full) == len(loader()) == 6
    for k in (1, 2, 5):  # odd k: the next batch comes from worker 1's stream, yet the DataLoader asks worker 0 first
        stream.set_epoch(1, start=k * B * 2)
        assert same_batches(list(loader()), full[k:]), k


def test_dataloader_order_is_the_workers_batches_in_turn(shards, monkeypatch):
    stream = ShardStream(shards, B, 0, 2, 2, as_float)
    got = keys(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
    w0, w1 = (worker_batches(shards, 0, 2, 2, w, seed=0, monkeypatch=monkeypatch) for w in (0, 1))
    assert got == keys([b for pair in zip(w0, w1) for b in pair])


# ----------------------------------------------------------------------------- bad images, the CLI

def test_corrupt_image_is_reported_not_raised(images, tmp_path):
    root, records = images
    (root / "broken.png").write_bytes(b"<html>not found</html>")
    paths = write_shards(records[:7] + [Record("broken.png", ["a broken picture"])], root, tmp_path, per_shard=8)
    batches = list(ShardStream(paths, 8, 0, 1, 0, as_float))
    assert len(batches) == 1
    images_, tokens, bad = batches[0]
    assert images_.shape[0] == tokens.shape[0] == 7 and len(bad) == 1
    assert bad[0] == f"{paths[0]}:000000007.png"


def test_cli_writes_a_split_and_prints_the_pattern(images, tmp_path):
    root, records = images
    data = {"images": [{"filename": r.image, "split": "train" if i < 50 else "test",
                        "sentences": [{"raw": c} for c in r.captions]} for i, r in enumerate(records)]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    result = subprocess.run([sys.executable, str(ROOT / "shards.py"), str(tmp_path / "captions.json"), "--images",
                             str(root), "--out", str(tmp_path / "out"), "--per-shard", "20"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    spec = result.stdout.strip().splitlines()[-1]
    assert spec == f"{tmp_path / 'out'}/shards-{{000000..000002}}.tar" and is_shards(spec)
    paths = expand_shards(spec)
    assert [count_samples(p) for p in paths] == [20, 20, 10]
    assert [caption for p in paths for _, _, _, caption in read_samples(p)] == [f"picture {i}" for i in range(50)]


def test_train_py_on_shards_resumes_after_sigkill_to_the_same_weights(tmp_path):
    """train.py --data 'shards-{...}.tar': the built-in-style data written as 4 shards; a run killed part-way and
    resumed ends with the weights of an uninterrupted one (the stream picks up at the sample it stopped at). Both
    runs take their steps in 2 chunks (--accum-chunks), which a resume must not disturb either."""
    from synthetic import generate
    from test_train import killed_and_resumed, run_train, weights
    data = generate(tmp_path / "shapes", seed=1, n_train=96, n_val=16, n_test=16, image_size=32, workers=1)
    from data import read_captions
    written = write_shards(read_captions(data, "train"), data.parent / "images", tmp_path / "tar", per_shard=24)
    spec = tmp_path / "tar" / f"shards-{{000000..{len(written) - 1:06d}}}.tar"
    steps = 40  # 12 batches of 8 per epoch: the run crosses epochs
    chunks = ("--accum-chunks", "2")
    result = run_train(tmp_path / "straight", spec, *chunks, steps=steps)
    assert "96 samples in 4 shards" in result.stdout
    killed = tmp_path / "killed"
    killed_and_resumed(killed, spec, *chunks, steps=steps)
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
