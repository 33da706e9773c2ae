"""adapters.py: each formula on tiny hand-computed inputs, the invariants of the methods (ratio 0 and alpha 0 give
zero-shot, FD-Align's KL is 0 for an unchanged encoder, cross-modal batches hold text), the protocol (seeded K-shot
splits saved and reloaded, the test split read only at the end), and a short CPU run of every method."""
import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapters
import fewshot
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


def method_argv(data, ckpt, out, method, *extra):
    """The command line of a short CPU run of `method` on the tiny task (python adapters.py ...)."""
    return ["--init", str(ckpt), "--data", str(data), "--out", str(out), "--method", method, "--shots", "4",
            "--seed", "1", "--aug-views", "2", "--no-save", "--device", "cpu",
            "--feature-cache", str(out.parent / "features"), *extra]


def test_few_shot_split_seeded_saved_reloaded(tiny, tmp_path):
    data, _ = tiny
    a = fewshot.make_few_shot(str(data), 2, 1, tmp_path / "a.json")
    b = fewshot.make_few_shot(str(data), 2, 1, tmp_path / "b.json")
    assert a["train"] == b["train"] and a["val"] == b["val"]  # same seed, same files
    assert fewshot.make_few_shot(str(data), 2, 2, None)["train"] != a["train"]
    assert len(a["train"]) == 2 * 4 and len(a["val"]) == 2 * 4  # val = min(K, 4) per class
    assert json.loads((tmp_path / "a.json").read_text())["train"] == a["train"]
    assert fewshot.make_few_shot(str(data), 2, 1, tmp_path / "a.json")["train"] == a["train"]  # reloaded
    with pytest.raises(ValueError):
        fewshot.make_few_shot(str(data), 4, 1, tmp_path / "a.json")  # a file of another K is not silently reused
    k6 = fewshot.make_few_shot(str(data), 6, 1, None)
    assert len(k6["val"]) == 4 * 4  # val capped at 4 per class


def test_seeded_split_without_split_folders(tmp_path):
    root = tmp_path / "flat"
    make_imagefolder(tmp_path / "f", per_split=(10, 0, 0))
    (tmp_path / "f" / "train").rename(root)
    s = fewshot.make_few_shot(str(root), 2, 1, None)
    assert not {p for p, _ in s["train"]} & {p for p, _ in s["val"]}
    test = fewshot.read_test(str(root), s["classes"])
    assert not {p for p, _ in test} & ({p for p, _ in s["train"]} | {p for p, _ in s["val"]})


def test_cross_modal_batches_contain_text(tiny, tmp_path):
    data, ckpt = tiny
    args = adapters.parse_args(method_argv(data, ckpt, tmp_path / "run", "cross-modal"))
    bank = adapters.load_bank(args.init, torch.device("cpu"), nullcontext(), args.feature_cache, args.aug_min_scale)
    split = fewshot.make_few_shot(args.data, args.shots, args.seed, None)
    task = adapters.build_task(bank, split, ["a photo of a {}.", "a {} thing."], args.aug_views)
    seen = []
    head = lambda x: (seen.append(x), torch.zeros(len(x), 4, requires_grad=True))[1]
    loss = adapters.feature_loss(task, head, seed=1, with_text=True)(torch.arange(6))
    text = F.normalize(task.text, dim=-1).flatten(0, 1)
    assert [len(x) for x in seen] == [6, 6]  # half images, half text
    assert all(any(torch.allclose(row, t) for t in text) for row in seen[1])  # the second half are text embeddings
    assert abs(loss.item() - math.log(4)) < 1e-5
    seen.clear()
    adapters.feature_loss(task, head, seed=1, with_text=False)(torch.arange(6))
    assert [len(x) for x in seen] == [6]  # uni-modal: images only


def test_test_split_read_only_at_the_end(tiny, tmp_path, monkeypatch):
    data, ckpt = tiny
    events = []
    read_split, load_image = fewshot.read_split, fewshot.load_image
    monkeypatch.setattr(fewshot, "read_split",
                        lambda root, split: (events.append(("list", split)), read_split(root, split))[1])
    for module in (fewshot, adapters):  # the cached features open images in fewshot.py, fine-tuning in adapters.py
        monkeypatch.setattr(module, "load_image",
                            lambda p: (events.append(("open", "/test/" in str(p))), load_image(p))[1])
    for method in ("tip-adapter-f", "finetune"):
        events.clear()
        adapters.main(method_argv(data, ckpt, tmp_path / method, method, "--epochs", "2",
                                  "--feature-cache", str(tmp_path / method / "features")))
        listed = [s for kind, s in events if kind == "list"]
        assert listed.count("test") == 1 and listed[-1] == "test"
        first_test = events.index(("list", "test"))
        assert not any(kind == "open" and is_test for kind, is_test in events[:first_test])  # no test image before
        assert any(kind == "open" and is_test for kind, is_test in events[first_test:])


@pytest.mark.parametrize("method", [m for m in adapters.METHODS if m != "zeroshot"])
def test_short_run_improves_training_accuracy(tiny, tmp_path, method):
    torch.set_num_threads(1)
    data, ckpt = tiny
    epochs = 10 if method in ("finetune", "fd-align") else 30  # the two that train the image encoder
    lr = {"fd-align": 1e-3, "finetune": 1e-3, "coop": 1e-2}.get(method)
    extra = ["--epochs", str(epochs), "--n-ctx", "4", "--ratios", "0.6", "--batch-size", "128", "--wd", "0.1"]
    if lr is not None:
        extra += ["--lr", str(lr)]  # otherwise the method's default
    r = adapters.main(method_argv(data, ckpt, tmp_path / method, method, *extra))
    assert r["train_acc"] > r["train_acc_zeroshot"], r
    assert 0 <= r["test_acc"] <= 1 and json.loads((tmp_path / method / "results.json").read_text())["method"] == method


def test_loop_flags_not_given_take_the_method_defaults(tiny):
    """--epochs/--lr/--wd/--batch-size/--patience not given take the method's defaults, given ones are kept (also when
    they equal another entry point's default); --out defaults to a folder of its own per method, K and seed."""
    data, ckpt = tiny
    base = ["--method", "coop", "--init", str(ckpt), "--data", str(data)]
    args = adapters.parse_args(base + ["--shots", "2", "--seed", "3"])
    fit = adapters.fit_settings(args)
    assert args.out.endswith("coop-2shot-seed3")
    assert (fit.lr, fit.epochs) == (adapters.METHOD_DEFAULTS["coop"]["lr"], adapters.METHOD_DEFAULTS["coop"]["epochs"])
    args = adapters.parse_args(base + ["--lr", "0.5", "--out", "x"])
    assert (adapters.fit_settings(args).lr, args.out) == (0.5, "x")  # given values are kept
    assert adapters.fit_settings(adapters.parse_args(base + ["--lr", "1e-3"])).lr == 1e-3  # ... also train.py's 1e-3
    assert adapters.fit_settings(adapters.parse_args(base + ["--method", "finetune"])).patience == 5


def test_command_line_errors_are_one_line(tiny, tmp_path, capsys):
    data, ckpt = tiny
    with pytest.raises(SystemExit) as e:
        adapters.main(["--help"])
    assert e.value.code == 0 and "linear-probe: epochs=60" in capsys.readouterr().out  # the defaults table
    for argv, named in ((["--method", "coop"], "--init"),
                        (["--method", "coop", "--init", str(tmp_path / "no.pt")], "no.pt"),
                        (["--method", "coop", "--init", str(ckpt), "--data", str(tmp_path / "none")], "--data")):
        with pytest.raises(SystemExit) as e:
            adapters.main(argv)
        assert str(e.value.code).startswith("error: ") and named in e.value.code  # sys.exit(message): exit status 1
