"""
Exercise tip_adapter_logits: Tip-Adapter's training-free cache model, a key-value memory of the few-shot images
added to zero-shot CLIP.

Read: Tip-Adapter (Zhang et al. 2022, https://arxiv.org/abs/2207.09519), section 3.2; the released
code, gaopengcuhk/Tip-Adapter main.py (https://github.com/gaopengcuhk/Tip-Adapter).

    python exercises.py check tip_adapter_logits
    python exercises.py hint tip_adapter_logits

You will need: import torch.
"""


def tip_adapter_logits(image_features, cache_keys, cache_values, text_weights, alpha, beta):
    """logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) L.

    image_features f (B, D): test images, L2-normalised.
    cache_keys K (N, D): the N few-shot training images' features, L2-normalised.
    cache_values L (N, C): their labels, one-hot.
    text_weights W (C, D): zero-shot class weights, L2-normalised.
    alpha: how much the cache counts; beta: how sharply it prefers the nearest cached images.
    Returns (B, C) logits.
    """
    # YOUR CODE HERE (about 3 lines)
    raise NotImplementedError("tip_adapter_logits: write the cache model")
