"""
Tests for data.py and synthetic.py: every caption format, the clear errors, deterministic caption draws and
augmentation (also across DataLoader workers and after a mid-epoch resume), skipping corrupt images, and the
Shapes generator's determinism and caching.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic
from data import (BadSample, CaptionEvalDataset, CaptionTrainDataset, EpochSampler, Record, check_images,
                  collate_skip_bad, count_truncated, make_loader, read_captions)
from transform import image_transform, train_augment


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- caption formats

def test_karpathy_json_with_coco_filepath_and_restval(tmp_path):
    data = {"dataset": "coco", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog."}, {"raw": "a brown dog."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "a cat."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "a bird."}]}]}
    path = write(tmp_path / "dataset_coco.json", json.dumps(data))
    assert read_captions(path, "train") == [("a.jpg", ["a dog.", "a brown dog."]), ("val2014/b.jpg", ["a cat."])]
    assert read_captions(path, "test") == [Record("val2014/c.jpg", ["a bird."])]
    assert len(read_captions(path)) == 3
    with pytest.raises(ValueError, match=r"no split 'val'; its splits are: test, train"):
        read_captions(path, "val")


def test_flickr8k_token_file_with_split_lists(tmp_path):
    lines = [f"{name}.jpg#{n}\t{name} caption {n} ." for name in ["img1", "img2", "img3"] for n in range(2)]
    path = write(tmp_path / "Flickr8k.token.txt", "\n".join(lines) + "\n")
    assert read_captions(path) == [("img1.jpg", ["img1 caption 0 .", "img1 caption 1 ."]),
                                   ("img2.jpg", ["img2 caption 0 .", "img2 caption 1 ."]),
                                   ("img3.jpg", ["img3 caption 0 .", "img3 caption 1 ."])]
    with pytest.raises(ValueError, match="no split information"):  # the split lists are not there yet
        read_captions(path, "train")
    for tag, names in [("train", "img1.jpg\nimg3.jpg\n"), ("dev", "img2.jpg\n"), ("test", "")]:
        write(tmp_path / f"Flickr_8k.{tag}Images.txt", names)
    assert [r.image for r in read_captions(path, "train")] == ["img1.jpg", "img3.jpg"]
    assert [r.image for r in read_captions(path, "val")] == ["img2.jpg"]  # val = Flickr8k's dev list


def test_tutorial_list_json(tmp_path):
    data = [{"image": "imgs\\sub\\1.jpg", "caption": ["one", "uno"]}, {"image": "2.jpg", "caption": "two"}]
    path = write(tmp_path / "captions.json", json.dumps(data))
    assert read_captions(path) == [("imgs/sub/1.jpg", ["one", "uno"]), ("2.jpg", ["two"])]
    with pytest.raises(ValueError, match="no split information.*split=None"):
        read_captions(path, "train")


def test_csv_with_commas_quotes_and_grouping(tmp_path):
    text = ('image,caption\n'
            'a.jpg,"A man says ""hi"", then leaves, slowly."\n'
            'b.jpg,A dog runs\n'
            'a.jpg,  A second caption for a  \n')
    path = write(tmp_path / "captions.txt", text)  # Kaggle's Flickr8k file is a CSV named .txt
    assert read_captions(path) == [("a.jpg", ['A man says "hi", then leaves, slowly.', "A second caption for a"]),
                                   ("b.jpg", ["A dog runs"])]


def test_csv_with_split_column(tmp_path):
    path = write(tmp_path / "c.csv", "image,caption,split\nx.png,an x,train\ny.png,a y,test\nx.png,an X,train\n")
    assert read_captions(path, "train") == [("x.png", ["an x", "an X"])]


@pytest.mark.parametrize("text", ["hello world\nsecond line\n", '{"dataset": "x"}', "[1, 2, 3]", "{broken json", ""])
def test_unknown_format_names_file_and_formats(tmp_path, text):
    path = write(tmp_path / "weird.txt", text)
    with pytest.raises(ValueError) as e:
        read_captions(path)
    assert str(path) in str(e.value) and "Accepted caption files" in str(e.value)


def test_missing_images_reported_with_count_paths_and_root(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "present.png")
    records = [Record("present.png", ["x"]), Record("gone1.png", ["y"]), Record("sub/gone2.png", ["z"])]
    with pytest.raises(FileNotFoundError) as e:
        check_images(records, tmp_path)
    message = str(e.value)
    assert "2 of 3 images are missing" in message and "gone1.png" in message and "sub/gone2.png" in message
    assert str(tmp_path.resolve()) in message
    check_images(records[:1], tmp_path)  # nothing missing: no error
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_images(records, tmp_path / "nope")


def test_count_truncated():
    records = [Record("a", ["short caption", "word " * 100]), Record("b", ["another short one"])]
    assert count_truncated(records, 77) == 1
    assert count_truncated(records, 4) == 2  # "short caption" is 2 tokens: fits exactly (SOT + 2 + EOT)
    assert count_truncated(records, 3) == 3


# ----------------------------------------------------------------------------- datasets and loaders

@pytest.fixture
def noise_images(tmp_path):
    """Six 40x40 random-noise PNGs, five captions each."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(Record(f"{i}.png", [f"image {i} caption {k}" for k in range(5)]))
    return records, tmp_path


def test_train_sample_is_pure_function_of_seed_epoch_index(noise_images):
    records, root = noise_images
    ds = CaptionTrainDataset(records, root, train_augment(32), context_length=16, seed=7)
    ds.set_epoch(3)
    torch.manual_seed(123)
    first = [ds[i] for i in range(6)]
    torch.manual_seed(999)  # global RNG state must not matter, nor the order of access
    again = [ds[i] for i in reversed(range(6))][::-1]
    for (im1, tok1), (im2, tok2) in zip(first, again):
        assert torch.equal(im1, im2) and torch.equal(tok1, tok2)
    assert torch.equal(ds[(3, 2)][0], first[2][0])  # an (epoch, index) key from EpochSampler, same sample
    ds.set_epoch(4)  # a new epoch draws new captions and new crops
    other = [ds[i] for i in range(6)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other))
    assert first[0][1].shape == (16,) and first[0][1].dtype == torch.long
    # the caption is one of the image's own captions
    captions = {tuple(t.tolist()) for t in __import__("tokenizer").tokenize(records[2].captions, 16)}
    assert tuple(first[2][1].tolist()) in captions


def test_cached_images_give_the_same_samples_without_reading_the_files_again(noise_images):
    records, root = noise_images
    plain = CaptionTrainDataset(records, root, train_augment(32), context_length=16, seed=3)
    cached = CaptionTrainDataset(records, root, train_augment(32), context_length=16, seed=3, cache=True)
    first = [cached[i] for i in range(6)]
    for i in range(6):
        assert torch.equal(plain[i][0], first[i][0]) and torch.equal(plain[i][1], first[i][1])  # same samples
        (root / records[i].image).unlink()  # from now on only the cache has them
    for i in range(6):
        assert torch.equal(cached[i][0], first[i][0]) and torch.equal(cached[i][1], first[i][1])
    assert isinstance(plain[0], BadSample)  # the uncached dataset reads the (now missing) file each time
    assert cached[(1, 0)][0].shape == (3, 32, 32)  # another epoch: a new crop of the cached image


def epochs_of_batches(records, root, workers, epochs=(0, 1), start=0):
    ds = CaptionTrainDataset(records, root, train_augment(32), context_length=16, seed=1)
    loader = make_loader(ds, batch_size=2, train=True, seed=5, workers=workers)
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch, start=start if epoch == epochs[0] else 0)
        out += [(images, tokens) for images, tokens, bad in loader]
    return out


def test_same_batches_with_any_number_of_workers_and_after_resume(noise_images):
    records, root = noise_images
    serial = epochs_of_batches(records, root, workers=0)
    parallel = epochs_of_batches(records, root, workers=2)  # persistent workers: the epoch travels with the index
    assert len(serial) == len(parallel) == 6  # 3 batches per epoch, 2 epochs
    for (a_img, a_tok), (b_img, b_tok) in zip(serial, parallel):
        assert torch.equal(a_img, b_img) and torch.equal(a_tok, b_tok)
    assert not torch.equal(serial[0][0], serial[3][0])  # epochs differ
    resumed = epochs_of_batches(records, root, workers=0, start=2)  # resume epoch 0 after one batch of 2
    assert len(resumed) == 5
    for (a_img, a_tok), (b_img, b_tok) in zip(serial[1:], resumed):
        assert torch.equal(a_img, b_img) and torch.equal(a_tok, b_tok)


def test_corrupt_image_is_skipped_and_named(noise_images):
    records, root = noise_images
    good = (root / "0.png").read_bytes()
    (root / "1.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    (root / "2.png").write_bytes(b"not an image at all")
    ds = CaptionTrainDataset(records, root, train_augment(32), context_length=16)
    assert isinstance(ds[1], BadSample) and ds[1].path.endswith("1.png") and "1.png" in ds[1].error
    images, tokens, bad = collate_skip_bad([ds[i] for i in range(4)])
    assert images.shape == (2, 3, 32, 32) and tokens.shape == (2, 16)
    assert [p.rsplit("/", 1)[-1] for p in bad] == ["1.png", "2.png"]
    images, tokens, bad = collate_skip_bad([ds[1]])  # a batch with nothing left is empty, not an error
    assert images.numel() == 0 and len(bad) == 1


def test_eval_dataset_images_and_flat_captions(noise_images):
    records, root = noise_images
    ds = CaptionEvalDataset(records[:3], root, image_transform(32))
    assert len(ds) == 3 and len(ds.captions) == 15 and ds.captions[5] == "image 1 caption 0"
    assert ds.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    image, index = ds[2]
    assert image.shape == (3, 32, 32) and index == 2
    first_only = CaptionEvalDataset(records[:3], root, image_transform(32), captions_per_image=1)
    assert first_only.captions == ["image 0 caption 0", "image 1 caption 0", "image 2 caption 0"]
    assert first_only.caption_image.tolist() == [0, 1, 2]
    loader = make_loader(ds, batch_size=2, train=False)
    assert [idx.tolist() for _, idx in loader] == [[0, 1], [2]]


def test_epoch_sampler_order_and_start_offset():
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for _, i in full) == list(range(50)) and all(e == 2 for e, _ in full)
    sampler.set_epoch(2, start=20)
    assert list(sampler) == full[20:] and len(sampler) == 30
    fresh = EpochSampler(50, seed=3)
    fresh.set_epoch(2)
    assert list(fresh) == full  # pure function of (seed, epoch)
    fresh.set_epoch(3)
    assert [i for _, i in fresh] != [i for _, i in full]


# ----------------------------------------------------------------------------- synthetic Shapes dataset

TINY = dict(n_train=6, n_val=2, n_test=4, image_size=32)


def test_shapes_generation_is_deterministic_and_karpathy_compatible(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=11, workers=1, **TINY)
    b = synthetic.generate(tmp_path / "b", seed=11, workers=2, **TINY)  # parallel gives the same bytes
    assert a.read_text() == b.read_text()
    for png in sorted((tmp_path / "a" / "images").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()
    data = json.loads(a.read_text())
    assert data["dataset"] == "shapes" and len(data["images"]) == 12
    for im in data["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for obj in im["attributes"]["objects"]:  # every caption names each object's colour and shape
            for raw in raws:
                assert any(w in raw.lower() for w in synthetic.COLOUR_WORDS[obj["colour"]])
                assert any(w in raw.lower() for w in synthetic.SHAPE_WORDS[obj["shape"]])
    test = read_captions(a, "test")
    assert len(test) == 4 and len(test[0].captions) == 5
    check_images(test, tmp_path / "a" / "images")
    c = synthetic.generate(tmp_path / "c", seed=12, workers=1, **TINY)
    assert c.read_text() != a.read_text()
    synthetic.save_preview(a, tmp_path / "preview.png", n=3)
    assert Image.open(tmp_path / "preview.png").height > 3 * 32


def test_shifted_style_draws_same_scenes_differently(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=0, workers=1, **TINY)
    b = synthetic.generate(tmp_path / "b", seed=0, workers=1, style="shifted", **TINY)
    objects = lambda p: [[(o["shape"], o["colour"]) for o in im["attributes"]["objects"]]
                         for im in json.loads(p.read_text())["images"]]
    assert objects(a) == objects(b)
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "b/images/000000.png").read_bytes()
    assert Image.open(tmp_path / "b/images/000000.png").size == (32, 32)


def test_ensure_shapes_caches_by_params(tmp_path, monkeypatch):
    calls = []
    real_generate = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    root = tmp_path / "shapes"
    path = synthetic.ensure_shapes(root, seed=0, workers=1, **TINY)
    assert len(calls) == 1 and path == root / "dataset_shapes.json"
    assert synthetic.ensure_shapes(root, seed=0, workers=1, **TINY) == path and len(calls) == 1  # cached
    synthetic.ensure_shapes(root, seed=1, workers=1, **TINY)  # other parameters: regenerated
    assert len(calls) == 2 and json.loads(path.read_text())["params"]["seed"] == 1
    path.unlink()  # an interrupted run leaves no JSON: regenerated
    synthetic.ensure_shapes(root, seed=1, workers=1, **TINY)
    assert len(calls) == 3
    small = dict(TINY, n_train=2)  # a smaller dataset removes the images it no longer has
    synthetic.ensure_shapes(root, seed=1, workers=1, **small)
    assert len(list((root / "images").glob("*.png"))) == 8


def test_epoch_sampler_keeps_groups_together():
    plain, paired = EpochSampler(50, seed=3), EpochSampler(50, seed=3, group=2)
    assert list(EpochSampler(50, seed=3, group=1)) == list(plain)  # group=1 is the plain shuffle
    order = [i for _, i in paired]
    assert sorted(order) == list(range(50)) and order != [i for _, i in plain]
    assert all(order[k] % 2 == 0 and order[k + 1] == order[k] + 1 for k in range(0, 50, 2))  # pairs side by side
    paired.set_epoch(1)
    assert [i for _, i in paired] != order  # reshuffled per epoch
    odd = [i for _, i in EpochSampler(7, seed=0, group=2)]
    assert sorted(odd) == list(range(7))


def test_minimal_pairs_differ_in_one_thing_and_leave_val_test_alone(tmp_path):
    from data import minimal_pair_group
    sizes = dict(n_train=40, n_val=2, n_test=4, image_size=32)
    paired = synthetic.generate(tmp_path / "p", seed=5, workers=1, minimal_pairs=True, **sizes)
    plain = synthetic.generate(tmp_path / "q", seed=5, workers=1, **sizes)
    images = json.loads(paired.read_text())["images"]
    changed = set()
    for first, twin in zip(images[0:40:2], images[1:40:2]):
        a, b = first["attributes"], twin["attributes"]
        kind = b["changed"]
        changed.add(kind)
        assert a["background"] == b["background"] and a["layout"] == b["layout"]
        looks = lambda s: [(o["shape"], o["colour"], o["size"], o["position"]) for o in s["objects"]]
        diff = [(x, y) for x, y in zip(looks(a), looks(b)) if x != y]
        if kind == "binding":  # the colours swapped between the two objects, everything else kept
            (s0, c0, z0, p0), (s1, c1, z1, p1) = looks(a)
            assert looks(b) == [(s0, c1, z0, p0), (s1, c0, z1, p1)] and c0 != c1
        elif kind == "order":  # the two objects trade places: same positions, what stands there swapped
            (s0, c0, z0, p0), (s1, c1, z1, p1) = looks(a)
            assert looks(b) == [(s1, c1, z1, p0), (s0, c0, z0, p1)]
        else:
            assert len(diff) == 1 and sum(p != q for p, q in zip(*diff[0])) == 1, (kind, diff)
    assert {"shape", "colour", "size"} <= changed
    for name in ["000040.png", "000041.png", "000045.png"]:  # val and test images are the same as without pairs
        assert (tmp_path / "p/images" / name).read_bytes() == (tmp_path / "q/images" / name).read_bytes()
    assert minimal_pair_group(paired, read_captions(paired, "train"), 8) == 2
    assert minimal_pair_group(plain, read_captions(plain, "train"), 8) == 1
    assert minimal_pair_group(paired, read_captions(paired, "train"), 7) == 1  # an odd batch would split pairs
