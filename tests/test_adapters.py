"""adapters.py: each formula on tiny hand-computed inputs, the invariants of the methods (ratio 0 and alpha 0 give
zero-shot, FD-Align's KL is 0 for an unchanged encoder, cross-modal batches hold text), the protocol (seeded K-shot
splits saved and reloaded, the test split read only at the end), and a short CPU run of every method."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapters
from adapters import (CLIPAdapter, class_prototypes, clip_logits, residual_blend, spurious_kl, spurious_prototypes,
                      tip_adapter_logits, tip_cache, wise_ft)
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT

XS = str(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")
COLOURS = {"red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 90, 240), "yellow": (245, 220, 30)}


# ----------------------------------------------------------------------------- formulas by hand


def test_clip_logits_and_prototypes_by_hand():
    f, w = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(clip_logits(f, w), torch.tensor([[60.0, 80.0]]))  # 100 * cos
    t = torch.tensor([[[2.0, 0.0], [0.0, 3.0]],  # class 0: two templates
                      [[0.0, 1.0], [0.0, 5.0]]])  # class 1
    s = 1 / math.sqrt(2)
    # normalise each template, average, renormalise: class 0 -> (0.5, 0.5) -> (s, s)
    assert torch.allclose(class_prototypes(t), torch.tensor([[s, s], [0.0, 1.0]]))
    # spurious: per template, average over classes: template 0 -> ((1,0) + (0,1)) / 2 -> (s, s); template 1 -> (0, 1)
    assert torch.allclose(spurious_prototypes(t), torch.tensor([[s, s], [0.0, 1.0]]))


def test_tip_adapter_logits_by_hand():
    f = torch.tensor([[1.0, 0.0]])
    keys, values = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # affinities (1, 0) -> exp(-3 * (1 - 1)) = 1, exp(-3 * (1 - 0)) = e^-3; times alpha 2, plus 100 f W^T = (100, 0)
    want = torch.tensor([[100 + 2.0, 2 * math.exp(-3)]])
    assert torch.allclose(tip_adapter_logits(f, keys, values, w, alpha=2.0, beta=3.0), want)


def test_tip_alpha_zero_is_zeroshot():
    g = torch.Generator().manual_seed(0)
    f, keys, w = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (5, 12, 3))
    values = F.one_hot(torch.arange(12) % 3, 3).float()
    assert torch.allclose(tip_adapter_logits(f, keys, values, w, 0.0, 5.5), clip_logits(f, w), atol=1e-5)


def test_tip_cache_averages_views_before_normalising():
    views = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # (A=2 views, N=1, D=2), raw features
    keys, values = tip_cache(views, torch.tensor([1]), 3)
    assert torch.allclose(keys, F.normalize(torch.tensor([[1.0, 0.5]]), dim=-1))  # not (s, s): no per-view norm
    assert torch.equal(values, torch.tensor([[0.0, 1.0, 0.0]]))


def test_clip_adapter_shape_blend_and_ratio_zero():
    torch.manual_seed(0)
    dim = CLIPConfig.from_json(XS).embed_dim
    ad = CLIPAdapter(dim, reduction=4, ratio=0.2)
    assert [tuple(p.shape) for p in ad.parameters()] == [(dim // 4, dim), (dim, dim // 4)]  # no biases
    x = torch.randn(3, dim)
    assert torch.allclose(ad(x), 0.2 * ad.fc(x) + 0.8 * x)
    assert (CLIPAdapter(dim, ratio=1.0)(x) >= 0).all()  # ReLU after the second layer too
    assert torch.allclose(residual_blend(torch.tensor(1.0), torch.tensor(3.0), 0.25), torch.tensor(1.5))
    w = torch.randn(4, dim)
    assert torch.equal(clip_logits(CLIPAdapter(dim, ratio=0.0)(x), w), clip_logits(x, w))  # ratio 0 = zero-shot


@pytest.mark.filterwarnings("ignore:reduction")  # torch warns that 'mean' is not 'batchmean': the point here
def test_spurious_kl_direction_reduction_and_zero():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    f0, ft = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert spurious_kl(f0, f0, protos).abs() < 1e-6  # unchanged encoder: 0
    log_p0 = F.log_softmax(clip_logits(f0, protos), -1)
    log_pt = F.log_softmax(clip_logits(ft, protos), -1)
    by_hand = (log_p0.exp() * (log_p0 - log_pt)).sum(-1).mean()  # KL(P_0 || P_t), batch mean
    assert by_hand > 0 and torch.allclose(spurious_kl(ft, f0, protos), by_hand, atol=1e-5)
    assert not torch.allclose(spurious_kl(f0, ft, protos), by_hand, atol=1e-3)  # the direction matters
    # the reference code's nn.KLDivLoss() ('mean' over batch x prototypes) is ours / n_prototypes
    reference = torch.nn.KLDivLoss()(log_pt, log_p0.exp())
    assert torch.allclose(reference * protos.shape[0], by_hand, atol=1e-4)


def test_wise_ft_by_hand():
    assert torch.allclose(wise_ft(torch.tensor([2.0]), torch.tensor([0.0]), 0.25), torch.tensor([1.5]))


def test_template_sets():
    from templates import IMAGENET7, OPENAI80, SINGLE
    assert len(SINGLE) == 1 and len(IMAGENET7) == 7 and len(OPENAI80) == len(set(OPENAI80)) == 80
    assert all(t.count("{}") == 1 for t in OPENAI80 + IMAGENET7)

# ----------------------------------------------------------------------------- a tiny task


def make_imagefolder(root, per_split=(8, 4, 6), size=32, seed=0):
    """Four colour classes of noisy 32x32 images, with train/val/test folders."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), per_split):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(0, 40, (size, size, 3)) + rgb, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{split}{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    torch.manual_seed(0)
    ckpt = root / "xs.pt"
    save_checkpoint(ckpt, CLIP(CLIPConfig.from_json(XS)))
    return make_imagefolder(root / "data"), ckpt


def method_args(data, ckpt, out, method, **kw):
    p = argparse.ArgumentParser()
    for flag, default in (("--init", None), ("--data", None), ("--out", None), ("--epochs", 6), ("--batch-size", 128),
                          ("--lr", 1e-3), ("--wd", 0.1), ("--seed", 0), ("--workers", 0), ("--device", "cpu"),
                          ("--precision", None)):
        p.add_argument(flag, default=default, type=type(default) if default is not None else None)
    adapters.add_method_args(p)
    args = p.parse_args(["--init", str(ckpt), "--data", str(data), "--out", str(out), "--method", method,
                         "--shots", "4", "--seed", "1", "--aug-views", "2", "--no-save",
                         "--feature-cache", str(out.parent / "features")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_few_shot_split_seeded_saved_reloaded(tiny, tmp_path):
    data, _ = tiny
    a = adapters.make_few_shot(str(data), 2, 1, tmp_path / "a.json")
    b = adapters.make_few_shot(str(data), 2, 1, tmp_path / "b.json")
    assert a["train"] == b["train"] and a["val"] == b["val"]  # same seed, same files
    assert adapters.make_few_shot(str(data), 2, 2, None)["train"] != a["train"]
    assert len(a["train"]) == 2 * 4 and len(a["val"]) == 2 * 4  # val = min(K, 4) per class
    assert json.loads((tmp_path / "a.json").read_text())["train"] == a["train"]
    assert adapters.make_few_shot(str(data), 2, 1, tmp_path / "a.json")["train"] == a["train"]  # reloaded
    with pytest.raises(ValueError):
        adapters.make_few_shot(str(data), 4, 1, tmp_path / "a.json")  # a file of another K is not silently reused
    k6 = adapters.make_few_shot(str(data), 6, 1, None)
    assert len(k6["val"]) == 4 * 4  # val capped at 4 per class


def test_seeded_split_without_split_folders(tmp_path):
    root = tmp_path / "flat"
    make_imagefolder(tmp_path / "f", per_split=(10, 0, 0))
    (tmp_path / "f" / "train").rename(root)
    s = adapters.make_few_shot(str(root), 2, 1, None)
    assert not {p for p, _ in s["train"]} & {p for p, _ in s["val"]}
    test = adapters.read_test(str(root), s["classes"])
    assert not {p for p, _ in test} & ({p for p, _ in s["train"]} | {p for p, _ in s["val"]})


def test_cross_modal_batches_contain_text(tiny, tmp_path):
    data, ckpt = tiny
    args = method_args(data, ckpt, tmp_path / "run", "cross-modal")
    hp = adapters.resolve(args)
    task, _, _ = adapters.build_task(hp, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    seen = []
    head = lambda x: (seen.append(x), torch.zeros(len(x), 4, requires_grad=True))[1]
    loss, _, _ = adapters.cross_modal_batches(task, head, use_text=True)(torch.arange(6), 0)
    text = F.normalize(task.text, dim=-1).flatten(0, 1)
    assert [len(x) for x in seen] == [6, 6]  # half images, half text
    assert all(any(torch.allclose(row, t) for t in text) for row in seen[1])  # the second half are text embeddings
    assert abs(loss.item() - math.log(4)) < 1e-5
    seen.clear()
    adapters.cross_modal_batches(task, head, use_text=False)(torch.arange(6), 0)
    assert [len(x) for x in seen] == [6]  # uni-modal: images only


def test_test_split_read_only_at_the_end(tiny, tmp_path, monkeypatch):
    data, ckpt = tiny
    events = []
    read_split, load_image = adapters.read_split, adapters.load_image
    monkeypatch.setattr(adapters, "read_split", lambda root, split: (events.append(("list", split)), read_split(root, split))[1])
    monkeypatch.setattr(adapters, "load_image", lambda p: (events.append(("open", "/test/" in str(p))), load_image(p))[1])
    monkeypatch.setattr(adapters, "_BANKS", {})
    for method in ("tip-adapter-f", "finetune"):
        events.clear()
        adapters.run_method(method_args(data, ckpt, tmp_path / method, method, epochs=2,
                                        feature_cache=str(tmp_path / method / "features")))
        listed = [s for kind, s in events if kind == "list"]
        assert listed.count("test") == 1 and listed[-1] == "test"
        first_test = events.index(("list", "test"))
        assert not any(kind == "open" and is_test for kind, is_test in events[:first_test])  # no test image before
        assert any(kind == "open" and is_test for kind, is_test in events[first_test:])


@pytest.mark.parametrize("method", [m for m in adapters.METHODS if m != "zeroshot"])
def test_short_run_improves_training_accuracy(tiny, tmp_path, method):
    torch.set_num_threads(1)
    data, ckpt = tiny
    epochs = 10 if method in adapters.ENCODER_METHODS else 30
    lr = {"fd-align": 1e-3, "finetune": 1e-3, "coop": 1e-2}.get(method)
    args = method_args(data, ckpt, tmp_path / method, method, epochs=epochs, n_ctx=4, ratios=[0.6], lr=lr or 1e-3)
    if lr is None:
        args.lr = None  # the method's default
    r = adapters.run_method(args)
    assert r["train_acc"] > r["train_acc_zeroshot"], r
    assert 0 <= r["test_acc"] <= 1 and json.loads((tmp_path / method / "results.json").read_text())["method"] == method


def test_train_py_defaults_become_method_defaults(tiny):
    """Flags not typed take the method's defaults; the run never writes into train.py's --out."""
    train = pytest.importorskip("train")
    data, ckpt = tiny
    args = train.get_args(["--method", "coop", "--init", str(ckpt), "--data", str(data), "--shots", "2", "--seed", "3"])
    assert args.typed >= {"method", "init", "data", "shots", "seed"} and "lr" not in args.typed
    hp = adapters.resolve(args)
    assert hp.out != args.out and hp.out.endswith("coop-2shot-seed3")
    assert (hp.lr, hp.epochs) == (adapters.METHOD_DEFAULTS["coop"]["lr"], adapters.METHOD_DEFAULTS["coop"]["epochs"])
    hp = adapters.resolve(train.get_args(["--method", "coop", "--init", str(ckpt), "--data", str(data), "--lr", "0.5",
                                          "--out", "x"]))
    assert (hp.lr, hp.out) == (0.5, "x")  # typed values are kept
    hp = adapters.resolve(train.get_args(["--method", "coop", "--init", str(ckpt), "--data", str(data), "--lr", "1e-3"]))
    assert hp.lr == 1e-3  # ... also when they equal train.py's default (train.py's --lr is 1e-3, coop's 2e-3)
