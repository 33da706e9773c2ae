"""
Exercise eot_pool: one vector per caption, read at the end-of-text token.

Read: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), section 2.4: "the activations of the highest
layer of the transformer at the [EOS] token are treated as the feature representation of the text"; openai/CLIP
clip/model.py, encode_text (https://github.com/openai/CLIP).

    python exercises.py check eot_pool
    python exercises.py hint eot_pool

You will need: import torch.
"""


def eot_pool(x, tokens):
    """Each caption's features at its EOT token.

    x: (B, L, width), the text Transformer's output (after ln_final), one row of L places per caption.
    tokens: (B, L) ids, as tokenizer.tokenize makes them: SOT (49406), the caption's ids, EOT (49407), then zeros.
    Captions have different lengths, so EOT is at a different place in each row.
    Returns (B, width).
    """
    # YOUR CODE HERE (about 2 lines)
    raise NotImplementedError("eot_pool: pool at the EOT token")
