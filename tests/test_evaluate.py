"""
Tests for evaluate.py: FAISS recall equals the brute-force torch oracle (also with exact ties), a tiny example
worked out by hand, the any-of-its-captions rule for image -> text, the 1-caption protocol, an end-to-end
evaluation of a tiny random CLIP on a few generated images, bf16 features close to fp32 ones, and the choice of
loader workers and torch threads for the cores free.
"""
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from data import read_captions
from evaluate import (brute_force_recall, encode_images, encode_texts, evaluate_retrieval, faiss_ranked,
                      format_results, recall_at_k)
from model import CLIP, CLIPConfig
from transform import image_transform

ROOT = Path(__file__).resolve().parents[1]
needs_faiss = pytest.mark.skipif(evaluate.faiss is None, reason="faiss is not installed")


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def noisy_captions(images, per_image, noise, rng):
    """per_image noisy copies of each image feature -> (text features, caption_image)."""
    caption_image = np.repeat(np.arange(len(images)), per_image)
    return unit(images[caption_image] + noise * rng.standard_normal((len(caption_image), images.shape[1]))), caption_image


# ----------------------------------------------------------------------------- FAISS == brute force

@needs_faiss
@pytest.mark.parametrize("seed", [0, 1])
def test_faiss_matches_brute_force_on_random_features(seed):
    rng = np.random.default_rng(seed)
    images = unit(rng.standard_normal((300, 32)))
    texts, caption_image = noisy_captions(images, 5, noise=0.35, rng=rng)
    ks = (1, 5, 10, 50)
    fast, slow = recall_at_k(images, texts, caption_image, ks), brute_force_recall(images, texts, caption_image, ks)
    assert fast == slow
    assert 0.05 < fast["text_to_image"]["R@1"] < 0.95  # neither trivial nor hopeless, so the test means something


@needs_faiss
def test_faiss_matches_brute_force_with_duplicated_images_and_captions():
    rng = np.random.default_rng(2)
    base = unit(rng.standard_normal((60, 16)))
    images = np.concatenate([base, base[:30], base[:10]])  # images 60..99 duplicate 0..39: exact ties
    texts, caption_image = noisy_captions(images, 5, noise=0.5, rng=rng)
    texts[1::5] = texts[0::5]  # every image's 2nd caption repeats its 1st: ties in image -> text too
    fast = recall_at_k(images, texts, caption_image)
    assert fast == brute_force_recall(images, texts, caption_image)
    # a copy scores exactly like its lower-index twin and so always ranks after it: its captions never hit at R@1
    copies = caption_image >= 60
    for recall in (recall_at_k, brute_force_recall):
        assert recall(images, texts[copies], caption_image[copies])["text_to_image"]["R@1"] == 0.0


@needs_faiss
@pytest.mark.parametrize("seed", range(3))
def test_faiss_ranked_breaks_ties_by_lower_index(seed):
    # Entries in {-1, 0, 1}: every dot product is a small integer, computed exactly by any BLAS, so the ties are
    # real for both libraries, and there are many of them, also across the cut at k.
    rng = np.random.default_rng(seed)
    database = rng.integers(-1, 2, size=(200, 6)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(400, 6)).astype(np.float32)
    scores = queries @ database.T  # exact
    expected = np.argsort(-scores, axis=1, kind="stable")  # stable sort: equal scores keep index order
    for k in (1, 5, 10):
        got = faiss_ranked(queries, database, k)
        assert np.array_equal(got, expected[:, :k]), k
    # and the recalls agree with the oracle on such tie-heavy data (unnormalised features: still inner products)
    caption_image = rng.integers(0, len(database), size=len(queries))
    assert recall_at_k(database, queries, caption_image) == brute_force_recall(database, queries, caption_image)


# ----------------------------------------------------------------------------- the definition, by hand

def at_angles(degrees):
    return np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees], dtype=np.float32)


@pytest.mark.parametrize("recall", [recall_at_k, brute_force_recall])
def test_hand_computed_example(recall):
    # Unit vectors in the plane: cosine similarity ranks by angular distance.
    images = at_angles([0, 90, 180])
    texts = at_angles([0, 100, 75, 170, 180, 20])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    # text -> image, rank of the caption's own image: t0 at 0 deg: img0 first (0). t1 at 100: img1 (10 deg away),
    # img2 (80), img0 (100) -> 2. t2 at 75: img1 -> 0. t3 at 170: img2, img1 -> 1. t4 at 180: img2 -> 0.
    # t5 at 20: img0, img1, img2 -> 2. Ranks [0, 2, 0, 1, 0, 2].
    # image -> text, rank of the best of its captions: img0: t0 (0 deg) -> 0. img1 at 90: t1 (10), t2 (15) -> 1.
    # img2 at 180: t4 (0) -> 0. Ranks [0, 1, 0].
    got = recall(images, texts, caption_image, ks=(1, 2, 3))
    assert got["text_to_image"] == pytest.approx({"R@1": 3 / 6, "R@2": 4 / 6, "R@3": 1.0})
    assert got["image_to_text"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0, "R@3": 1.0})


@pytest.mark.parametrize("recall", [recall_at_k, brute_force_recall])
def test_image_to_text_counts_any_of_the_captions(recall):
    rng = np.random.default_rng(0)
    images = unit(rng.standard_normal((20, 32)))
    texts = unit(rng.standard_normal((100, 32)))  # 5 unrelated captions per image...
    caption_image = np.repeat(np.arange(20), 5)
    texts[4::5] = images  # ...except the LAST caption of each image, which is the image itself
    five = recall(images, texts, caption_image)
    assert five["image_to_text"]["R@1"] == 1.0  # any of the five suffices
    # the 1cap protocol keeps only the first caption of each image: the unrelated one
    one = recall(images, texts[0::5], caption_image[0::5])
    assert one["image_to_text"]["R@10"] < 1.0


@pytest.mark.parametrize("recall", [recall_at_k, brute_force_recall])
def test_perfect_features_give_recall_one(recall):
    images = unit(np.random.default_rng(0).standard_normal((50, 16)))
    caption_image = np.repeat(np.arange(50), 5)
    got = recall(images, images[caption_image], caption_image)  # every caption equals its image
    assert all(v == 1.0 for d in ("text_to_image", "image_to_text") for v in got[d].values())


def test_without_faiss_recall_at_k_falls_back_to_brute_force(monkeypatch):
    rng = np.random.default_rng(3)
    images = unit(rng.standard_normal((40, 8)))
    texts, caption_image = noisy_captions(images, 5, noise=0.5, rng=rng)
    expected = brute_force_recall(images, texts, caption_image)
    monkeypatch.setattr(evaluate, "faiss", None)
    assert recall_at_k(images, texts, caption_image) == expected


def test_fewer_items_than_k():
    images = unit(np.random.default_rng(0).standard_normal((3, 8)))
    texts, caption_image = images[[2, 1, 0]], np.array([0, 1, 2])  # all wrong at R@1, all found at R@10
    for recall in (recall_at_k, brute_force_recall):
        got = recall(images, texts, caption_image)
        assert got["text_to_image"]["R@10"] == got["image_to_text"]["R@10"] == 1.0


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Six small PNGs with 5 captions each (one with 3), in a Karpathy JSON, and a tiny random CLIP."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    colours = ["red", "green", "blue", "yellow", "purple", "white"]
    rgb = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (128, 0, 128), (255, 255, 255)]
    entries = []
    for i, (name, c) in enumerate(zip(colours, rgb)):
        pixels = np.full((40, 48, 3), c, np.uint8)
        pixels[10:20, 5 * i:5 * i + 10] = 0  # a black block in a different place, so no two images are equal
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        sentences = [{"raw": f"a {name} picture, version {n}."} for n in range(3 if i == 2 else 5)]
        entries.append({"filename": f"{i}.png", "split": "train" if i == 5 else "test", "sentences": sentences})
    (root / "dataset_tiny.json").write_text(json.dumps({"dataset": "tiny", "images": entries}))
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")).eval()
    return root, read_captions(root / "dataset_tiny.json", "test"), model


def test_evaluate_retrieval_end_to_end(tiny, tmp_path):
    root, records, model = tiny
    results = evaluate_retrieval(model, records, root / "images", "5cap", "tiny test", batch_size=2, workers=0,
                                 device="cpu", save_dir=tmp_path / "features", progress=False)
    assert set(results) == {"split", "protocol", "images", "captions", "truncated_captions",
                            "text_to_image", "image_to_text"}
    assert (results["split"], results["protocol"], results["images"], results["captions"]) == ("tiny test", "5cap", 5, 23)
    for direction in ("text_to_image", "image_to_text"):
        assert list(results[direction]) == ["R@1", "R@5", "R@10"]
        assert all(0.0 <= v <= 1.0 for v in results[direction].values())
    assert results["text_to_image"]["R@5"] == 1.0  # only 5 images: the top 5 always holds the right one
    # the saved features are unit vectors in dataset order, with their ids, and give the same numbers again
    saved = tmp_path / "features"
    image_features, text_features = np.load(saved / "image_features.npy"), np.load(saved / "text_features.npy")
    ids = json.loads((saved / "ids.json").read_text())
    assert image_features.shape == (5, 64) and text_features.shape == (23, 64) and text_features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text_features, axis=1), 1.0, atol=1e-5)
    assert ids["images"] == [r.image for r in records] and ids["captions"][5] == "a green picture, version 0."
    again = recall_at_k(image_features, text_features, ids["caption_image"])
    assert again["text_to_image"] == results["text_to_image"] and again["image_to_text"] == results["image_to_text"]
    text = format_results(results)
    assert text.splitlines()[0] == "tiny test (5cap protocol): 5 images, 23 captions"
    assert "text->image" in text and "image->text" in text


def test_one_caption_protocol_and_batched_encoding_equals_one_at_a_time(tiny):
    root, records, model = tiny
    results = evaluate_retrieval(model, records, root / "images", "1cap", "tiny test", batch_size=3, workers=0,
                                 progress=False)
    assert (results["images"], results["captions"], results["protocol"]) == (5, 5, "1cap")
    # the tutorial's way: one image and one (first) caption at a time through the same model
    from data import CaptionEvalDataset
    from tokenizer import tokenize
    dataset = CaptionEvalDataset(records, root / "images", image_transform(32), captions_per_image=1)
    with torch.no_grad():
        one_by_one = [model.encode_image(dataset[i][0][None], normalize=True)[0] for i in range(len(dataset))]
        texts_one_by_one = [model.encode_text(tokenize(c, 16), normalize=True)[0] for c in dataset.captions]
    batched = encode_images(model, dataset, batch_size=4, workers=0, progress=False, precision="fp32")
    batched_texts = encode_texts(model, dataset.captions, batch_size=2, progress=False, precision="fp32")
    np.testing.assert_allclose(batched, torch.stack(one_by_one).numpy(), atol=1e-5)
    np.testing.assert_allclose(batched_texts, torch.stack(texts_one_by_one).numpy(), atol=1e-5)
    assert dataset.captions == [r.captions[0] for r in records]


def test_unknown_protocol_is_refused(tiny):
    root, records, model = tiny
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_retrieval(model, records, root / "images", "10cap")


# ----------------------------------------------------------------------------- precision, workers and threads

def cosines(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_precision_argument_bf16_features_close_to_fp32(tiny):
    root, records, model = tiny
    from data import CaptionEvalDataset
    dataset = CaptionEvalDataset(records, root / "images", image_transform(32))
    images = {p: encode_images(model, dataset, batch_size=4, workers=0, progress=False, precision=p, threads=1)
              for p in ("fp32", "bf16")}
    texts = {p: encode_texts(model, dataset.captions, batch_size=8, progress=False, precision=p, threads=1)
             for p in ("fp32", "bf16")}
    for features in (images, texts):
        assert features["bf16"].dtype == np.float32  # normalised in float32 whatever the autocast
        assert np.abs(features["bf16"] - features["fp32"]).max() > 0  # bf16 really ran
        assert cosines(features["bf16"], features["fp32"]).min() > 0.99
    results = evaluate_retrieval(model, records, root / "images", batch_size=4, workers=0, progress=False,
                                 precision="bf16")
    assert results["text_to_image"]["R@5"] == 1.0


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """A CaptionEvalDataset whose image is 300x200 pixels (more than evaluate.SMALL_IMAGE)."""
    from data import CaptionEvalDataset, Record
    root = tmp_path_factory.mktemp("big")
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(root / "big.png")
    return CaptionEvalDataset([Record("big.png", ["a black picture."])], root, image_transform(32))


def test_loader_workers_policy(tiny, big_images):
    root, records, model = tiny
    from data import CaptionEvalDataset
    small = CaptionEvalDataset(records, root / "images", image_transform(32))  # 48x40 images: decode here
    assert [evaluate.loader_workers(None, small, device, 16) for device in ("cpu", "cuda")] == [0, 0]
    # big images on the CPU: a worker per 4 free cores, at most 4; on a GPU all free cores but one, at most 4
    on_cpu = [evaluate.loader_workers(None, big_images, "cpu", free) for free in (1, 2, 3, 4, 8, 32)]
    assert on_cpu == [0, 0, 0, 1, 2, 4]
    assert [evaluate.loader_workers(None, big_images, "cuda", free) for free in (1, 2, 3, 16)] == [0, 1, 2, 4]
    assert evaluate.loader_workers(None, [0, 1], "cpu", 8) == 2  # size unknown: counted as big
    assert evaluate.loader_workers(3, small, "cpu", 1) == 3  # an explicit number wins


def test_torch_threads_policy():
    most = torch.get_num_threads()
    assert evaluate.torch_threads(None, "cpu", free=1) == 1  # one core free: one thread, whatever torch's setting
    assert evaluate.torch_threads(None, "cpu", free=64) == most  # never more than torch's own setting
    assert evaluate.torch_threads(None, "cpu", free=2, decoding_workers=2) == 1  # at least one
    assert evaluate.torch_threads(None, "cuda", free=1) is None  # the GPU does the matmuls: unchanged
    assert evaluate.torch_threads(3, "cpu", free=1) == 3  # an explicit number wins


def test_encode_plan_measures_only_when_something_is_automatic(tiny, big_images, monkeypatch):
    root, records, model = tiny
    monkeypatch.setattr(evaluate, "free_cores", lambda: pytest.fail("measured although nothing is automatic"))
    assert evaluate.encode_plan(2, 2, big_images, "cpu") == (2, 2)
    assert evaluate.encode_plan(2, None, big_images, "cuda") == (2, None)
    monkeypatch.setattr(evaluate, "free_cores", lambda: 8)
    assert evaluate.encode_plan(None, None, big_images, "cpu") == (2, min(6, torch.get_num_threads()))
    assert evaluate.encode_plan(None, 5, big_images, "cpu") == (2, 5)


def test_free_cores_counts_the_idle_time_other_processes_leave(monkeypatch):
    # two snapshots of /proc/stat 0.1 s apart: cpu0 busy all the time (10 user ticks), cpu1 idle (10 idle ticks)
    snapshots = iter(["cpu  9 0 0 9 0 0 0 0 0 0\ncpu0 5 0 0 4 0 0 0 0 0 0\ncpu1 4 0 0 5 0 0 0 0 0 0\nintr 1\n",
                      "cpu  29 0 0 29 0 0 0 0 0 0\ncpu0 15 0 0 4 0 0 0 0 0 0\ncpu1 4 0 0 15 0 0 0 0 0 0\nintr 2\n"])
    monkeypatch.setattr(evaluate, "open", lambda path: io.StringIO(next(snapshots)), raising=False)
    monkeypatch.setattr(evaluate.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: None)
    assert evaluate.free_cores() == 1
    monkeypatch.setattr(evaluate, "open", lambda path: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
    assert evaluate.free_cores() == 2  # cannot tell: all of them


def test_free_cores_on_this_machine_and_num_threads_restores():
    assert 1 <= evaluate.free_cores(0.05) <= len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    with evaluate.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
