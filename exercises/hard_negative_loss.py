"""
Exercise hard_negative_loss: teach CLIP word order and binding by ranking each image's caption above captions that
differ from it in one thing ("a red star left of a blue circle" vs "a blue star left of a red circle").

Read: SVLC (Doveh et al. 2023, "Teaching Structured Vision&Language Concepts to Vision&Language Models",
https://arxiv.org/abs/2211.11733), section 3.3; NegCLIP (Yuksekgonul et al. 2023, https://arxiv.org/abs/2210.01936),
section 5; this project's negatives.py makes such captions for the built-in Shapes data.

    python exercises.py check hard_negative_loss
    python exercises.py hint hard_negative_loss

You will need: import torch; import torch.nn.functional as F.
"""


def hard_negative_loss(image_features, text_features, negative_features, negative_valid, logit_scale):
    """Each image against its own caption and its own K hard negatives only.

    image_features (B, D), text_features (B, D): L2-normalised, row i of each a matching pair.
    negative_features (B, K, D): L2-normalised; row i holds image i's K hard-negative captions.
    negative_valid (B, K) bool: False where a negative is missing (some captions have fewer); it must count for nothing.
    logit_scale: a 0-d tensor, 1 / temperature.
    Returns a 0-d tensor: the mean over images of the cross-entropy over 1 + K scaled cosines, the caption first.
    """
    # YOUR CODE HERE (about 6 lines)
    raise NotImplementedError("hard_negative_loss: write the hard-negative loss")
