"""Label prompts (label_prompts.py, losses.label_prompt_loss): which class a caption names, read from its tokens, and
the loss of each labelled image against all class prompts."""
import torch
import torch.nn.functional as F

from label_prompts import LabelPrompts, word_ids
from losses import label_prompt_loss
from tokenizer import tokenize


def test_labels_read_the_one_class_a_caption_names():
    prompts = LabelPrompts("shape", 32)
    assert prompts.names == ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon"]
    captions = {"A small red circle on the left on a dotted background.": 0,
                "A big six-sided shape, blue, at the top.": 7,  # a synonym of three words
                "A checkered backdrop with a red rhombus.": 6,  # a word of three tokens
                "A plus sign and a cross, both green.": 5,  # two words of one class
                "A red disc and a blue circle.": 0,
                "A red disc and a blue five-pointed star.": -1,  # two classes: no label
                "Two dogs play on a beach.": -1,  # none
                "A hexagonal tile.": -1}  # not the word "hexagon"
    labels = prompts.labels(tokenize(list(captions), 32))
    assert labels.tolist() == list(captions.values())
    assert LabelPrompts("colour", 32).labels(tokenize(list(captions)[:3], 32)).tolist() == [0, 4, 0]  # red, blue, red


def test_prompts_are_one_caption_per_class():
    prompts = LabelPrompts("shape", 16, weight=0.5)
    assert prompts.tokens.shape == (8, 16) and len(prompts) == 8 and prompts.weight == 0.5
    assert torch.equal(prompts.tokens[7], tokenize(["a hexagon"], 16)[0])
    assert word_ids("six-sided shape").tolist() == tokenize(["six-sided shape"], 8)[0, 1:5].tolist()


def test_label_prompt_loss_is_cross_entropy_over_the_prompts_of_labelled_images():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    prompts = F.normalize(torch.randn(3, 8, generator=g), dim=-1).requires_grad_()
    labels = torch.tensor([2, -1, 0, 1, -1])
    loss = label_prompt_loss(images, prompts, labels, 10.0)
    by_hand = sum(-torch.log_softmax(10.0 * images[i] @ prompts.T, dim=-1)[c] for i, c in ((0, 2), (2, 0), (3, 1))) / 3
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert prompts.grad.abs().sum() > 0
    none = label_prompt_loss(images, prompts, torch.full((5,), -1), 10.0)
    assert none.item() == 0.0 and none.requires_grad  # no labelled image: 0, and backward still works
    none.backward()


def test_train_turns_label_prompts_on_for_the_built_in_data_only():
    from train import get_args
    assert (get_args([]).label_prompts, get_args([]).label_prompt_weight) == ("shape", 2.0)
    assert get_args(["--data", "captions.json", "--images", "img"]).label_prompts == ""  # real captions: off
    assert get_args(["--data", "captions.json", "--images", "img", "--label-prompts", "shape"]).label_prompts == "shape"
    assert get_args(["--label-prompts", ""]).label_prompts == ""
