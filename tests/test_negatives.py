"""negatives.py (NegCLIP-style hard-negative captions) and the hard-negative term of losses.clip_loss."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from negatives import confusable, even_odds, hard_negative, KINDS, mined_odds, sample_negatives, spans
from synthetic import SHAPES
from synthetic import make_captions, sample_scene, STYLES
from model import CLIP, CLIPConfig
from tokenizer import tokenize
from losses import clip_loss, hard_negative_loss

PAIR = "A small red circle to the left of a big blue star on a striped background."


def rng(seed=0):
    return np.random.default_rng(seed)


def words(text):
    return text.lower().rstrip(".").replace(",", "").split()


def test_spans_find_every_attribute_longest_first():
    found = [(kind, value) for _, _, kind, value in spans("To the left is a scarlet six-sided shape and on the right "
                                                          "is a tiny white plus sign.")]
    assert found == [("position", "left"), ("colour", "red"), ("shape", "hexagon"), ("position", "right"),
                     ("size", "small"), ("colour", "white"), ("shape", "cross")]
    assert [k for _, _, k, _ in spans(PAIR)] == ["size", "colour", "shape", "relation", "size", "colour", "shape"]


@pytest.mark.parametrize("kind", ["shape", "colour", "size"])
def test_replacing_one_attribute_changes_one_word_of_that_kind(kind):
    for seed in range(20):
        negative = hard_negative(PAIR, kind, rng(seed))
        before, after = spans(PAIR), spans(negative)
        changed = [(b, a) for b, a in zip(before, after) if b[2:] != a[2:]]
        assert len(before) == len(after) and len(changed) == 1, negative
        assert changed[0][0][2] == changed[0][1][2] == kind
        assert len(set(words(PAIR)) ^ set(words(negative))) <= 4  # one word (or phrase) in, one out


def test_binding_swaps_the_two_colours_and_keeps_the_bag_of_words():
    negative = hard_negative(PAIR, "binding", rng())
    assert negative == "A small blue circle to the left of a big red star on a striped background."
    assert sorted(words(negative)) == sorted(words(PAIR))  # a bag-of-words model cannot tell them apart
    assert hard_negative("A red circle and a red star side by side.", "binding", rng()) is None  # same colours
    assert hard_negative("A small red circle on a gray background.", "binding", rng()) is None  # one object


def test_order_swaps_the_objects_only_where_the_caption_says_where_they_are():
    assert hard_negative(PAIR, "order", rng()) == \
        "A big blue star to the left of a small red circle on a striped background."
    assert hard_negative("A red circle and a blue star side by side on a gray background.", "order", rng()) is None
    assert hard_negative("On the left is a red circle and on the right is a blue star.", "order", rng()) == \
        "On the left is a blue star and on the right is a red circle."


def test_place_flips_relations_and_moves_single_objects():
    assert hard_negative(PAIR, "place", rng()) == \
        "A small red circle to the right of a big blue star on a striped background."
    assert hard_negative("A red circle above a blue star.", "place", rng()) == "A red circle below a blue star."
    assert hard_negative("Near the top is a red circle and near the bottom is a blue star.", "place", rng()) == \
        "Near the bottom is a red circle and near the top is a blue star."
    moved = hard_negative("In the middle, a red circle against a gray backdrop.", "place", rng())
    assert moved[0].isupper() and spans(moved)[0][3] != "centre" and moved.endswith("a red circle against a gray backdrop.")


def test_articles_follow_the_new_word():
    for seed in range(30):
        negative = hard_negative("A red circle on a gray background.", "colour", rng(seed))
        colour = negative.split()[1]
        assert negative.startswith("An " if colour[0] in "aeiou" else "A "), negative
    assert hard_negative("An orange circle left of a red star.", "binding", rng()) == "A red circle left of an orange star."


def test_sample_negatives_are_distinct_new_and_deterministic():
    for seed in range(50):
        out = sample_negatives(PAIR, 3, rng(seed))
        assert len(out) == 3 and len(set(out)) == 3 and PAIR not in out
        assert out == sample_negatives(PAIR, 3, rng(seed))
    assert sample_negatives("A photo of a dog on a beach.", 2, rng()) == []  # other datasets: no hard negative
    with pytest.raises(ValueError, match="unknown hard-negative kind"):
        hard_negative(PAIR, "tense", rng())


def test_no_negative_of_a_generated_caption_describes_its_scene():
    """On real Shapes captions: every negative differs from all five true captions of its scene, and every kind
    applies somewhere."""
    used = set()
    for i in range(300):
        scene = sample_scene(np.random.default_rng([7, i, 0]), list(STYLES["default"].backgrounds))
        captions = make_captions(scene, np.random.default_rng([7, i, 1]))
        for c in captions:
            for kind in KINDS:
                negative = hard_negative(c, kind, rng(i))
                if negative is not None:
                    used.add(kind)
                    assert negative not in captions, (c, kind, negative)
    assert used == set(KINDS)


def test_confusable_draws_the_values_the_model_confuses_most_often():
    features = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    features[7] = F.normalize(features[0] + 0.05 * features[7], dim=0)  # value 7 nearly the same as value 0
    odds = confusable(features, temperature=0.05, uniform=0.5)
    assert odds.shape == (8, 8) and np.allclose(odds.sum(axis=1), 1) and np.all(np.diag(odds) == 0)
    assert odds[0].argmax() == 7 and odds[7].argmax() == 0 and odds[0, 7] > 0.5  # half uniform + most of the rest
    assert np.all(odds[0, 1:7] >= 0.5 / 7)  # every other value still comes up
    assert np.allclose(confusable(features, uniform=1.0), even_odds(["shape"])["shape"].numpy() / 7)


def test_mined_odds_steer_the_replacement_shape():
    odds = {"shape": torch.zeros(8, 8, dtype=torch.float64)}
    odds["shape"][SHAPES.index("circle"), SHAPES.index("hexagon")] = 1.0  # a circle always becomes a hexagon
    for seed in range(20):
        negative = hard_negative("A small red circle on the left.", "shape", rng(seed), odds)
        assert negative in ("A small red hexagon on the left.", "A small red six-sided shape on the left.")
    assert even_odds(["size", "place"]) == {} and set(even_odds(KINDS)) == {"shape", "colour"}


def test_mined_odds_come_from_the_model_text_features():
    model = CLIP(CLIPConfig.from_json(Path(__file__).parents[1] / "model_configs" / "MiniCLIP-XS-32px.json"))
    odds = mined_odds(model, ["shape"], torch.autocast("cpu", enabled=False))["shape"]
    phrases = ["a circle", "a square", "a triangle", "a star", "a heart", "a cross", "a diamond", "a hexagon"]
    with torch.no_grad():
        features = model.encode_text(tokenize(phrases, model.config.text.context_length), normalize=True)
    assert torch.allclose(odds, torch.from_numpy(confusable(features)))


def test_clip_loss_hard_negatives_are_extra_image_to_text_columns():
    g = torch.Generator().manual_seed(0)
    img, txt, neg = (F.normalize(torch.randn(n, 16, generator=g), dim=-1) for n in (4, 4, 6))
    scale = torch.tensor(10.0)
    labels = torch.arange(4)
    plain = (F.cross_entropy(scale * img @ txt.T, labels) + F.cross_entropy(scale * txt @ img.T, labels)) / 2
    assert torch.allclose(clip_loss(img, txt, scale), plain)
    hard = (F.cross_entropy(scale * img @ torch.cat([txt, neg]).T, labels)
            + F.cross_entropy(scale * txt @ img.T, labels)) / 2  # NegCLIP: the text->image side is unchanged
    assert torch.allclose(clip_loss(img, txt, scale, neg), hard)
    assert clip_loss(img, txt, scale, neg) > clip_loss(img, txt, scale)  # more negatives, higher loss
    none_valid = torch.zeros(6, dtype=torch.bool)
    assert torch.allclose(clip_loss(img, txt, scale, neg, none_valid), plain)  # masked negatives count for nothing
    some = torch.tensor([True, False, True, False, False, True])
    expected = (F.cross_entropy(scale * img @ torch.cat([txt, neg[some]]).T, labels)
                + F.cross_entropy(scale * txt @ img.T, labels)) / 2
    assert torch.allclose(clip_loss(img, txt, scale, neg, some), expected)


def test_hard_negative_loss_is_each_image_against_its_own_negatives_only():
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(3, 16, generator=g), dim=-1) for _ in range(2))
    neg = F.normalize(torch.randn(3, 2, 16, generator=g), dim=-1)  # (B, K, D)
    scale, valid = torch.tensor(10.0), torch.tensor([[True, True], [True, False], [False, False]])
    want = torch.stack([F.cross_entropy(scale * torch.cat([txt[i:i + 1], neg[i][valid[i]]]) @ img[i], torch.tensor(0))
                        for i in range(3)]).mean()  # row i: its caption first, then its own valid negatives
    assert torch.allclose(hard_negative_loss(img, txt, neg, valid, scale), want)
    assert want > 0
    # another image's negatives do not count: shuffling the negatives between images changes the loss
    assert not torch.allclose(hard_negative_loss(img, txt, neg.roll(1, 0), valid, scale), want)
    # an image whose negatives are all missing adds nothing (the row is a softmax over one candidate)
    none_valid = torch.tensor([[False, False], [False, False], [False, False]])
    assert hard_negative_loss(img, txt, neg, none_valid, scale) == 0
    # a caption far above its negatives: loss near 0; the same caption as its negative: log(1 + K)
    assert hard_negative_loss(img, img, -img[:, None].repeat(1, 2, 1), valid, torch.tensor(100.0)) < 1e-6
    same = hard_negative_loss(img, txt, txt[:, None].repeat(1, 2, 1), torch.ones(3, 2, dtype=torch.bool), scale)
    assert torch.allclose(same, torch.tensor(math.log(3.0)))


def test_train_dataset_returns_the_caption_then_its_negatives(tmp_path):
    from data import CaptionTrainDataset, Record
    from PIL import Image
    from tokenizer import tokenize
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [Record("a.png", (PAIR,)), Record("a.png", ("A photo of a dog.",))]
    ds = CaptionTrainDataset(records, tmp_path, lambda im: torch.zeros(3, 8, 8), 32, 0, sample_negatives, 2)
    _, tokens = ds[(0, 0)]
    assert tokens.shape == (3, 32) and torch.equal(tokens[0], tokenize(PAIR, 32)[0]) and tokens[1:].any(dim=-1).all()
    _, tokens = ds[(0, 1)]
    assert tokens.shape == (3, 32) and not tokens[1:].any()  # no negative found: all-zero rows (masked in the loss)
    plain = CaptionTrainDataset(records, tmp_path, lambda im: torch.zeros(3, 8, 8), 32, 0)
    assert plain[(0, 0)][1].shape == (32,)
    assert json.dumps(sample_negatives(PAIR, 2, rng(3)))  # plain strings
