"""adapters.py: each formula on tiny hand-computed inputs, the invariants of the methods (ratio 0 and alpha 0 give
zero-shot, FD-Align's KL is 0 for an unchanged encoder, cross-modal batches hold text), what each method starts from
(head inits, Tip-Adapter's cache, the logit scale, the optimiser), the linear probe against a Newton solve, the
protocol (seeded K-shot splits saved and reloaded, the test split read only at the end, features cached by content),
and a short CPU run of every method."""
import argparse
import dataclasses
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapters
import fewshot
from adapters import (CLIP_SCALE, CLIPAdapter, class_prototypes, clip_logits, logistic_regression, residual_blend,
                      search_c, spurious_kl, spurious_prototypes, tip_adapter_logits, tip_cache, wise_ft)
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT

XS = str(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")
COLOURS = {"red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 90, 240), "yellow": (245, 220, 30)}


# ----------------------------------------------------------------------------- formulas by hand


def test_clip_logits_and_prototypes_by_hand():
    f, w = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(clip_logits(f, w, 100.0), torch.tensor([[60.0, 80.0]]))  # 100 * cos
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
    assert torch.allclose(tip_adapter_logits(f, keys, values, w, 0.0, 5.5), clip_logits(f, w, CLIP_SCALE), atol=1e-5)


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
    assert torch.equal(clip_logits(CLIPAdapter(dim, ratio=0.0)(x), w, 18.0), clip_logits(x, w, 18.0))  # zero-shot


@pytest.mark.filterwarnings("ignore:reduction")  # torch warns that 'mean' is not 'batchmean': the point here
def test_spurious_kl_direction_reduction_and_zero():
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    f0, ft = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert spurious_kl(f0, f0, protos, 100.0).abs() < 1e-6  # unchanged encoder: 0
    log_p0 = F.log_softmax(clip_logits(f0, protos, 100.0), -1)
    log_pt = F.log_softmax(clip_logits(ft, protos, 100.0), -1)
    by_hand = (log_p0.exp() * (log_p0 - log_pt)).sum(-1).mean()  # KL(P_0 || P_t), batch mean
    assert by_hand > 0 and torch.allclose(spurious_kl(ft, f0, protos, 100.0), by_hand, atol=1e-5)
    assert not torch.allclose(spurious_kl(f0, ft, protos, 100.0), by_hand, atol=1e-3)  # the direction matters
    # the reference code's nn.KLDivLoss() ('mean' over batch x prototypes) is ours / n_prototypes
    reference = torch.nn.KLDivLoss()(log_pt, log_p0.exp())
    assert torch.allclose(reference * protos.shape[0], by_hand, atol=1e-4)


def test_wise_ft_by_hand():
    assert torch.allclose(wise_ft(torch.tensor([2.0]), torch.tensor([0.0]), 0.25), torch.tensor([1.5]))


def test_search_c_refines_to_an_eighth_of_a_decade():
    calls = []
    score = lambda c: (calls.append(c), -abs(math.log10(c) - 1.375))[1]  # peak at C = 10^1.375
    c, best = search_c(score)
    assert c == 10 ** 1.375 and best == 0.0
    assert len(calls) == len(set(calls)) <= 7 + 2 * 4  # the coarse grid, then 2 new points per halving at most
    assert sorted(calls)[0] == 1e-6 and sorted(calls)[-1] == 1e6


def newton_logistic_regression(x, y, k, c, iters=100):
    """The reference for the linear probe: the same objective (mean cross-entropy + ||W||^2 / (2 C N), bias
    unpenalised) minimised by damped Newton steps with the exact Hessian in float64, not by L-BFGS."""
    x = x.double()
    n, d = x.shape

    def f(t):
        w, b = t[:k * d].view(k, d), t[k * d:]
        return F.cross_entropy(x @ w.T + b, y) + (w ** 2).sum() / (2 * c * n)
    t = torch.zeros(k * (d + 1), dtype=torch.float64)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, t)
        if g.abs().max() < 1e-10:
            break
        h = torch.autograd.functional.hessian(f, t)
        step = torch.linalg.lstsq(h, g.unsqueeze(1)).solution[:, 0]  # a shared shift of b is a flat direction
        lr = 1.0
        while f(t - lr * step) > f(t) - 1e-4 * lr * (g @ step) and lr > 1e-8:
            lr /= 2
        t = t - lr * step
    return t[:k * d].view(k, d), t[k * d:]


def test_logistic_regression_is_the_regularised_optimum():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    x = F.normalize(torch.randn(30, 5, generator=g) + 2 * F.one_hot(y, 5).float(), dim=-1)
    for c in (0.01, 1.0, 100.0):
        w, b = logistic_regression(x, y, 3, c)
        w_ref, b_ref = newton_logistic_regression(x, y, 3, c)
        assert torch.allclose(w, w_ref, atol=1e-4) and torch.allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-4)
    assert logistic_regression(x, y, 3, 0.01)[0].norm() < logistic_regression(x, y, 3, 1.0)[0].norm()  # 1/C: L2


def test_aa_clip_blurs_like_the_reference_but_at_the_border():
    """AA-CLIP's calculate_similarity_map (forward_utils.py) blurs the patch grid before upsampling too, with
    kornia's gaussian_blur2d (7 taps at sigma 1, border 'reflect'); ours pads by replication: the only difference,
    and the one aa_clip.py's docstring lists."""
    import aa_clip
    x = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-t ** 2 / 2)
    k = k / k.sum()
    ref = F.conv2d(F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    ours = aa_clip.gaussian_smooth(x, 1.0)
    assert torch.allclose(ours[..., 3:-3, 3:-3], ref[..., 3:-3, 3:-3], atol=1e-6)  # the same blur inside
    assert not torch.allclose(ours, ref, atol=1e-3)  # not at the border
    doc = " ".join(aa_clip.__doc__.split())
    assert "reflect" in doc and "does not depend on the input size" not in doc


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


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    """The tiny task, 4-shot seed 1, 2 augmented views, as a method sees it."""
    data, ckpt = tiny
    bank = adapters.load_bank(str(ckpt), torch.device("cpu"), "fp32", tmp_path_factory.mktemp("f"), 0.5)
    return adapters.build_task(bank, fewshot.make_few_shot(str(data), 4, 1, None), ["a photo of a {}."], 2)


def test_feature_cache_follows_the_file_content(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, cache, image = CLIP(CLIPConfig.from_json(XS)).eval(), tmp_path / "features.pt", tmp_path / "x.bmp"
    bank = lambda: fewshot.FeatureBank(model, torch.device("cpu"), nullcontext(), cache)
    Image.fromarray(np.full((32, 32, 3), COLOURS["red"], np.uint8)).save(image)
    stat = os.stat(image)
    red = bank().get([str(image)])
    Image.fromarray(np.full((32, 32, 3), COLOURS["blue"], np.uint8)).save(image)  # another image, same name
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime (one clock tick)
    assert os.path.getsize(image) == stat.st_size  # and the same size
    blue = bank().get([str(image)])  # a second run sharing the cache file
    assert not torch.allclose(red, blue)
    assert torch.equal(blue, fewshot.FeatureBank(model, torch.device("cpu"), nullcontext()).get([str(image)]))
    monkeypatch.setattr(model, "encode_image", lambda x: pytest.fail("an unchanged file is encoded again"))
    assert torch.equal(bank().get([str(image)]), blue)


def test_head_inits(task):
    """uni-modal starts from a random head (a text-initialised one already carries the text: cross-modal
    adaptation's linear_probe.sh since Feb 2025), cross-modal from the text by default, cross-modal-random not."""
    fit, zs = adapters.Fit(epochs=0, lr=1e-3, wd=0.0, batch_size=8), class_prototypes(task.text)
    head = lambda method, init=None: adapters.METHOD_FNS[method](task, argparse.Namespace(head_init=init, wise_ft=0),
                                                                 fit)[2]["head"].weight.detach()
    assert not torch.allclose(head("uni-modal"), zs, atol=1e-2)
    assert not torch.allclose(head("cross-modal-random"), zs, atol=1e-2)
    assert torch.equal(head("cross-modal"), zs) and torch.equal(head("uni-modal", "zeroshot"), zs)
    assert head("uni-modal").abs().max() <= 1 / math.sqrt(zs.shape[1])  # nn.Linear's U(-1/sqrt(D), 1/sqrt(D))


def test_tip_adapter_keys_average_raw_views(task, monkeypatch):
    raw = torch.stack([task.bank.get([p for p, _ in task.train], v) for v in (1, 2)])  # (A, N, D), unnormalised
    seen, search = [], adapters.search_alpha_beta
    monkeypatch.setattr(adapters, "search_alpha_beta", lambda t, keys, *a: (seen.append(keys), search(t, keys, *a))[1])
    adapters.tip_adapter(task, (7.0, 3.0), (4, 4))
    assert torch.allclose(seen[0], F.normalize(raw.mean(0), dim=-1), atol=1e-6)
    assert not torch.allclose(seen[0], F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1), atol=1e-6)


def test_coop_and_clip_adapter_logits_use_the_model_temperature(task):
    """CoOp's trainers/coop.py and CLIP-Adapter's clip_adapter.py: logit_scale.exp() * cos, not 100 * cos."""
    t = task.model.logit_scale.exp().item()
    assert abs(t - 1 / 0.07) < 1e-3  # a fresh CLIP's temperature, far from 100
    f, fit = task.features(task.val), adapters.Fit(epochs=0, lr=1e-3, wd=0.0, batch_size=8)
    logits_fn, _, modules = adapters.coop(task, 4, fit)
    with torch.no_grad():
        assert torch.allclose(logits_fn(task.val), clip_logits(f, modules["prompts"]().cpu(), t), atol=1e-4)
    logits_fn, _, _ = adapters.clip_adapter(task, [0.0], 4, "image", fit)  # ratio 0: the zero-shot classifier
    assert torch.allclose(logits_fn(task.val), clip_logits(f, class_prototypes(task.text), t), atol=1e-4)


def test_optimisers_are_the_papers(tiny):
    """CoOp and CLIP-Adapter: Dassl's SGD (momentum 0.9, not Nesterov) with 1 warm-up epoch at the constant 1e-5,
    then cosine; FD-Align (and its fine-tuning baseline): SGD with Nesterov momentum, weight decay 5e-4."""
    data, ckpt = tiny
    fit = lambda m: adapters.fit_settings(adapters.parse_args(["--method", m, "--init", str(ckpt), "--data",
                                                               str(data)]))
    param = torch.nn.Parameter(torch.zeros(1))
    for method in ("coop", "clip-adapter"):
        optimizer, scheduler = adapters.make_optimizer([param], fit(method), steps_per_epoch=3)
        group = optimizer.param_groups[0]
        assert isinstance(optimizer, torch.optim.SGD) and (group["momentum"], group["nesterov"]) == (0.9, False)
        lrs = [(optimizer.param_groups[0]["lr"], optimizer.step(), scheduler.step())[0] for _ in range(6)]
        assert lrs[:3] == pytest.approx([1e-5] * 3) and lrs[3] == pytest.approx(fit(method).lr)  # then decays
        assert lrs[4] < lrs[3]
    for method in ("fd-align", "finetune"):
        optimizer, _ = adapters.make_optimizer([param], fit(method), steps_per_epoch=3)
        group = optimizer.param_groups[0]
        assert isinstance(optimizer, torch.optim.SGD) and group["nesterov"] and group["weight_decay"] == 5e-4


def test_linear_probe_chooses_c_on_val_and_matches_a_newton_solve(tiny, task, monkeypatch):
    data, _ = tiny
    get = task.bank.get
    no_test = lambda paths, view=0: get(paths, view) if not any("/test/" in p for p in paths) else pytest.fail("test")
    monkeypatch.setattr(task.bank, "get", no_test)  # the method never sees a test feature
    logits_fn, info, _ = adapters.linear_probe(task)
    shifted = dataclasses.replace(task, val=[(p, (y + 1) % 4) for p, y in task.val])  # other val labels
    assert adapters.linear_probe(shifted)[1]["C"] != info["C"]  # ... another C: it is chosen on val
    monkeypatch.undo()
    test, x, y = fewshot.read_test(str(data), sorted(COLOURS)), task.features(task.train), task.labels(task.train)
    w, b = newton_logistic_regression(x, y, 4, info["C"])
    test_x, test_y = task.features(test).double(), task.labels(test)
    reference = adapters.accuracy(test_x @ w.T + b, test_y)
    assert abs(adapters.accuracy(logits_fn(test), test_y) - reference) <= 0.005, (info, reference)


def test_few_shot_split_seeded_saved_reloaded(tiny, tmp_path):
    data, _ = tiny
    a = fewshot.make_few_shot(str(data), 2, 1, tmp_path / "a.json")
    b = fewshot.make_few_shot(str(data), 2, 1, tmp_path / "b.json")
    assert a["train"] == b["train"] and a["val"] == b["val"]  # same seed, same files
    assert fewshot.make_few_shot(str(data), 2, 2, None)["train"] != a["train"]
    assert len(a["train"]) == 2 * 4 and len(a["val"]) == 2 * 4  # val = min(K, 4) per class
    assert json.loads((tmp_path / "a.json").read_text())["train"] == a["train"]
    assert fewshot.make_few_shot(str(data), 2, 1, tmp_path / "a.json")["train"] == a["train"]  # reloaded
    with pytest.raises(ValueError, match="pass another --out"):  # a file of another K is not silently reused
        fewshot.make_few_shot(str(data), 4, 1, tmp_path / "a.json")
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
    bank = adapters.load_bank(args.init, torch.device("cpu"), "fp32", args.feature_cache, args.aug_min_scale)
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
    lr = {"coop": 1e-2}.get(method)
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
    assert e.value.code == 0 and "coop: epochs=" in capsys.readouterr().out  # the defaults table
    for argv, named in ((["--method", "coop"], "--init"),
                        (["--method", "coop", "--init", str(tmp_path / "no.pt")], "no.pt"),
                        (["--method", "coop", "--init", str(ckpt), "--data", str(tmp_path / "none")], "--data")):
        with pytest.raises(SystemExit) as e:
            adapters.main(argv)
        assert str(e.value.code).startswith("error: ") and named in e.value.code  # sys.exit(message): exit status 1
