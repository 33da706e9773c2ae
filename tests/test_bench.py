"""
Tests for bench.py's counting, not its timings: clip_flops against a hand count and against PyTorch's own
FlopCounterMode on a tiny CLIP (forward exactly, a training step within 5% of 3x the forward), the alternating
order of time_pair, the ratio's median [min-max], and the precisions the command line runs.
"""
import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from bench import clip_flops, transformer_flops
from model import CLIP, CLIPConfig, TextConfig, VisionConfig
from losses import clip_loss

TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                  text=TextConfig(context_length=12, vocab_size=100, width=32, heads=2, layers=2))


def counted_flops(fn):
    """FLOPs PyTorch counts for fn(): matmuls and convolutions. Attention runs as the MATH kernel, two batched
    matmuls that FlopCounterMode sees (it does not count the CPU's fused attention kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_transformer_flops_by_hand():
    # width 2, 3 tokens, MLP 8: q/k/v + out 2*3*2*(6+2) = 96; scores and weighted sum 2 * 2*3*3*2 = 72;
    # MLP 2 * 2*3*2*8 = 192
    assert transformer_flops(2, 1, 3) == 96 + 72 + 192
    assert transformer_flops(2, 5, 3) == 5 * 360
    # TINY's image: 16 patches of 3*8*8 -> 64 (2*16*192*64), 17 tokens, projection 64 -> 16
    assert clip_flops(TINY, text=False) == 2 * 16 * 192 * 64 + transformer_flops(64, 2, 17) + 2 * 64 * 16
    assert clip_flops(TINY) == clip_flops(TINY, text=False) + clip_flops(TINY, image=False)
    assert clip_flops(TINY, image=False, text_length=5) == transformer_flops(32, 2, 5) + 2 * 32 * 16


def test_clip_flops_equal_pytorchs_count():
    torch.manual_seed(0)
    model, batch = CLIP(TINY), 3
    images = torch.randn(batch, 3, 32, 32)
    tokens = torch.randint(1, 90, (batch, 12))
    tokens[:, -1] = 99  # EOT (the largest id) last: encode_text computes all 12 positions
    with torch.no_grad():
        assert counted_flops(lambda: model.encode_image(images)) == batch * clip_flops(TINY, text=False)
        assert counted_flops(lambda: model.encode_text(tokens)) == batch * clip_flops(TINY, image=False)
        assert counted_flops(lambda: model.encode_text(tokens[:, 4:])) == \
            batch * clip_flops(TINY, image=False, text_length=8)

    def step():
        clip_loss(*model(images, tokens)).backward()
    # backward: two products per forward one, less the patch convolution's gradient for the images (not needed)
    assert counted_flops(step) == pytest.approx(3 * batch * clip_flops(TINY), rel=0.05)


def test_clip_flops_count_the_conv_stem():
    """The stem's 3x3 stride-2 convolutions and the smaller patch projection after them, as PyTorch counts them
    (BatchNorm and ReLU are not matmuls: neither counts them)."""
    stem = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=32, layers=1, width=64, patch_size=8,
                                                        head_width=32, stem_channels=[8, 16]),
                      text=TINY.text)
    convs = 2 * 16 * 16 * 9 * 3 * 8 + 2 * 8 * 8 * 9 * 8 * 16  # 32 -> 16 -> 8 pixels a side
    assert clip_flops(stem, text=False) == convs + 2 * 16 * 16 * 4 * 64 + transformer_flops(64, 1, 17) + 2 * 64 * 16
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        assert counted_flops(lambda: CLIP(stem).eval().encode_image(images)) == 2 * clip_flops(stem, text=False)


def test_time_pair_alternates_and_ratio_reports_median_and_range():
    calls = []
    times = bench.time_pair({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then ABBA...
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4}
    calls.clear()  # sync (a GPU's synchronize) runs before each timer starts and before it stops
    bench.time_pair({"a": lambda: calls.append("a")}, repeats=2, warmup=0, sync=lambda: calls.append("sync"))
    assert calls == ["sync", "a", "sync"] * 2
    assert bench.ratio([2.0, 3.0, 4.0], [1.0, 1.0, 1.0]) == "3.00x [2.00-4.00]"


def test_precisions_and_bad_flags(capsys):
    default = ["fp32", "bf16"] if bench.cpu_has_bf16() else ["fp32"]
    assert bench.precisions_for("cpu", None) == default
    assert bench.precisions_for("cpu", "fp32") == ["fp32"]
    assert bench.precisions_for("cpu", "auto") == [default[-1]]
    bad = {("model", "--precision", "fp16"): "--precision fp16 needs a GPU",
           ("model", "--repeats", "0"): "--repeats",
           ("memory", "--device", "cuda"): "the memory section measures the CPU; run it with --device cpu"}
    if not torch.cuda.is_available():
        bad[("train", "--device", "cuda")] = "--device cuda: torch sees no CUDA GPU here"
    for argv, message in bad.items():
        with pytest.raises(SystemExit):
            bench.main(list(argv))
        assert message in capsys.readouterr().err


def test_index_case_measures_exact_and_approximate_search():
    """bench index's measurement on 2,000 vectors: exact search finds every true neighbour, HNSW (tuned by
    search.build_index to recall 0.95 on indexed vectors) most of them for new queries; latency and memory are set."""
    pytest.importorskip("faiss")
    x, queries = bench.random_rows(2000, 16, seed=0), bench.random_rows(50, 16, seed=1)
    build, mb, p50, p99, recall, info = bench.index_case(x, queries, "flat")
    assert recall == 1.0 and info == {"type": "flat"} and mb > 0 and 0 < p50 <= p99
    *_, recall, info = bench.index_case(x, queries, "hnsw")
    assert info["type"] == "hnsw" and recall >= 0.85


def test_fitted_gaussian_keeps_the_features_direction_and_spread():
    """bench index's stand-in for a million image features: unit vectors drawn with the mean and covariance of the
    given rows keep their mean direction and their uneven spread over directions (isotropic ones would not)."""
    rng = np.random.default_rng(0)
    scale = np.array([4.0, 2.0] + [0.3] * 14)  # most of the spread in two of 16 directions
    features = bench.unit_rows(rng.standard_normal((4000, 16)) * scale + 3.0 * np.eye(16)[5])  # (4000, 16)
    drawn = bench.fitted_gaussian(features)(4000, seed=1)
    assert drawn.shape == (4000, 16) and drawn.dtype == np.float32
    assert np.allclose(np.linalg.norm(drawn, axis=1), 1.0, atol=1e-5)

    def cosine(a, b):
        return abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)

    def axes(x):  # (variances largest first, the direction of the largest)
        values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
        return values[::-1], vectors[:, -1]
    (v_feat, axis_feat), (v_drawn, axis_drawn) = axes(features), axes(drawn)
    assert cosine(drawn.mean(axis=0), features.mean(axis=0)) > 0.99 and cosine(axis_drawn, axis_feat) > 0.95

    def effective_dim(variances):  # the participation ratio: 16 for isotropic rows
        return variances.sum() ** 2 / (variances ** 2).sum()
    assert effective_dim(v_feat) < 3 and abs(effective_dim(v_drawn) - effective_dim(v_feat)) < 1
    assert effective_dim(axes(bench.random_rows(4000, 16, seed=2))[0]) > 14
