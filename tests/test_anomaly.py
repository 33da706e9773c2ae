"""
Tests for anomaly_metrics.py and anomaly_data.py: AUROC and AP against brute-force implementations of their
definitions (ties included), the one-class error, the synthetic anomaly set's determinism and masks, the
MVTec and VisA readers, and the image/mask alignment of AnomalyDataset.
"""

import csv
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly_data
from anomaly_data import AnomalyDataset, ensure_anomaly_shapes, read_mvtec, read_visa
from anomaly_metrics import auroc, average_precision, per_category_table, pixel_ap, pixel_auroc

# ----------------------------------------------------------------------------- metrics


def brute_auroc(s, y):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pairs = [(p, n) for p, n in itertools.product(s[y == 1], s[y == 0])]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def brute_ap(s, y):
    """The definition: thresholds at each distinct score, highest first; AP = sum (R_n - R_{n-1}) P_n."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        predicted = s >= t
        tp = np.sum(predicted & (y == 1))
        precision, recall = tp / predicted.sum(), tp / np.sum(y == 1)
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


@pytest.mark.parametrize("trial", range(20))
def test_auroc_and_ap_match_brute_force_with_ties(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(2, 40))
    s = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    assert auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(brute_ap(s, y), abs=1e-12)


def test_auroc_special_cases_and_inputs():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auroc(s, y) == 1.0 and auroc(-s, y) == 0.0 and auroc(np.ones(6), y) == 0.5
    assert average_precision(s, y) == 1.0
    assert average_precision(np.ones(6), y) == pytest.approx(0.5)  # one threshold: precision = prevalence
    assert auroc(torch.tensor(s, dtype=torch.float32), torch.tensor(y).bool()) == 1.0  # tensors accepted


def test_one_class_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.5], [1, 1])
    with pytest.raises(ValueError, match="both classes"):
        average_precision([0.1, 0.5], [0, 0])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([0.1, 0.2, 0.3], [0, 1])


def test_pixel_metrics_flatten_maps_and_masks():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((3, 1, 8, 8)) > 0.8).float()  # (N, 1, H, W)
    maps = torch.from_numpy(rng.random((3, 8, 8))).float() + masks[:, 0]  # (N, H, W), defects score higher
    flat_s, flat_y = maps.numpy().ravel(), masks.numpy().ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(brute_auroc(flat_s, flat_y))
    assert pixel_ap(maps, masks) == pytest.approx(brute_ap(flat_s, flat_y))


def test_per_category_table():
    table = per_category_table({"a": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_ap": 0.5},
                                "b": {"image_auroc": 0.7, "pixel_auroc": 0.6, "pixel_ap": None}})
    lines = table.splitlines()
    assert lines[0] == "| category | image AUROC | pixel AUROC | pixel AP |"
    assert lines[2] == "| a | 90.0 | 80.0 | 50.0 |" and lines[3] == "| b | 70.0 | 60.0 | - |"
    assert lines[4] == "| **mean** | 80.0 | 70.0 | 50.0 |"

# ----------------------------------------------------------------------------- synthetic data and readers


TINY = dict(seed=3, image_size=32, n_train=2, n_test_good=2, n_test_defect=4)


def test_synthetic_dataset_is_deterministic_and_cached(tmp_path):
    a, b = ensure_anomaly_shapes(tmp_path / "a", **TINY), ensure_anomaly_shapes(tmp_path / "b", **TINY)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) == 1 + len(anomaly_data.CATEGORIES) * (2 + 2 + 4 + 4)  # params + images + masks
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    stamp = (a / anomaly_data.PARAMS_NAME).stat().st_mtime_ns
    ensure_anomaly_shapes(a, **TINY)  # same params: nothing is redrawn
    assert (a / anomaly_data.PARAMS_NAME).stat().st_mtime_ns == stamp
    other = ensure_anomaly_shapes(a, **dict(TINY, seed=4))  # other params: redrawn
    first = "tiles/train/good/000.png"
    assert (other / first).read_bytes() != (b / first).read_bytes()


def test_masks_binary_and_nonempty_exactly_for_defects(tmp_path):
    root = ensure_anomaly_shapes(tmp_path, **TINY)
    for category in anomaly_data.CATEGORIES:
        assert [label for _, label, _, _ in read_mvtec(root, category, "train")] == [0, 0]
        test = read_mvtec(root, category, "test")
        assert sorted(label for _, label, _, _ in test) == [0, 0, 1, 1, 1, 1]
        assert {d for _, label, _, d in test if label} == set(anomaly_data.DEFECTS)
        for image_path, label, mask_path, defect in test:
            assert (mask_path is None) == (label == 0)
            if label:
                mask = np.asarray(Image.open(mask_path))
                assert mask.shape == Image.open(image_path).size[::-1] == (32, 32)
                assert set(np.unique(mask)) == {0, 255}  # binary and not empty (nor the whole image)
                assert mask_path.parent.name == defect == image_path.parent.name


def test_read_mvtec_errors_name_the_folder(tmp_path):
    root = ensure_anomaly_shapes(tmp_path, **dict(TINY, n_test_defect=1))
    with pytest.raises(FileNotFoundError, match="no category folder .*carpet.*tiles"):
        read_mvtec(root, "carpet", "test")
    with pytest.raises(FileNotFoundError, match="no split folder .*val"):
        read_mvtec(root, "tiles", "val")
    (root / "tiles" / "ground_truth" / "scratch" / "000_mask.png").unlink()  # the one defect image is a scratch
    with pytest.raises(FileNotFoundError, match="000_mask.png is missing"):
        read_mvtec(root, "tiles", "test")


def test_read_visa_csv(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "n.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 1).save(tmp_path / "a_mask.png")  # VisA masks may hold 0/1
    rows = [("candle", "train", "normal", "n.png", ""), ("candle", "test", "normal", "n.png", ""),
            ("candle", "test", "anomaly", "a.png", "a_mask.png"), ("pcb1", "test", "normal", "n.png", "")]
    with open(tmp_path / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([("object", "split", "label", "image", "mask")] + rows)
    items = read_visa(tmp_path, "candle", "test", tmp_path / "1cls.csv")
    assert items == [(tmp_path / "n.png", 0, None, "good"), (tmp_path / "a.png", 1, tmp_path / "a_mask.png", "anomaly")]
    assert len(read_visa(tmp_path, "candle", "train", tmp_path / "1cls.csv")) == 1
    with pytest.raises(ValueError, match="no object 'fryum'.*candle, pcb1"):
        read_visa(tmp_path, "fryum", "test", tmp_path / "1cls.csv")
    mask = AnomalyDataset(items, 8)[1][2]
    assert mask.shape == (1, 8, 8) and mask.min() == 1  # 0/1 masks are binarised with > 0


def test_dataset_aligns_image_and_mask(tmp_path):
    # A non-square image is resized to a square without cropping: a defect at the side edge survives.
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    image[10:20, 30:42] = 255
    mask[10:20, 30:42] = 255
    image[30:40, 54:60] = 255  # at the right border, which a centre crop would cut off
    mask[30:40, 54:60] = 255
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    x, label, m = AnomalyDataset([(tmp_path / "x.png", 1, tmp_path / "x_mask.png", "square")], 20)[0]
    assert x.shape == (3, 20, 20) and m.shape == (1, 20, 20) and label == 1
    assert set(m.unique().tolist()) == {0.0, 1.0}
    # 60 x 40 -> 20 x 20 scales columns by 1/3 and rows by 1/2: the block lands at rows 5-9, columns 10-13
    assert m[0, 5:10, 10:14].all() and m[0, 15:20, 18:20].all() and m.sum() == 5 * 4 + 5 * 2
    bright = x.mean(0) > 0  # normalised: white is positive, black negative
    assert bright[6:9, 11:13].all() and not bright[:4].any() and not bright[:, :9].any()
    root = ensure_anomaly_shapes(tmp_path / "s", **TINY)
    good = [item for item in read_mvtec(root, "tablet", "test") if item[3] == "good"]
    _, label, m = AnomalyDataset(good, 24)[0]
    assert label == 0 and m.shape == (1, 24, 24) and m.sum() == 0
