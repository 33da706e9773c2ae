"""
Exercise clip_loss: the symmetric InfoNCE loss that trains CLIP.

Read: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), Figure 3 (the pseudocode) and section 2.3;
InfoNCE: van den Oord et al. 2018, https://arxiv.org/abs/1807.03748, section 2.3.
Bonus: NegCLIP (Yuksekgonul et al. 2023, https://arxiv.org/abs/2210.01936), section 5.

    python exercises.py check clip_loss     # compares your function with the project's, on random batches
    python exercises.py hint clip_loss      # the next hint

You will need: import torch; import torch.nn.functional as F.
"""


def clip_loss(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    """Symmetric InfoNCE over a batch of B matching (image, caption) pairs.

    image_features (B, D) and text_features (B, D): L2-normalised; row i of each belongs to pair i, and every other
    pairing in the batch is a negative. logit_scale: a 0-d tensor, 1 / temperature (CLIP learns it; 1/0.07 = 14.3
    at the start, at most 100).

    Returns a 0-d tensor: the mean of two cross-entropies over the scaled cosine-similarity matrix, one over its rows
    (each image picks its caption among the B captions) and one over its columns (each caption picks its image).

    Bonus (checked, not required): negative_features (N, D) are N extra captions that match no image (NegCLIP's
    hard negatives). They are extra columns of the image -> caption half only, so its logits are (B, B + N);
    negative_valid (N,) bool marks the real ones, and a column marked False must count for nothing.
    """
    # YOUR CODE HERE (about 5 lines; 4 more for the bonus)
    raise NotImplementedError("clip_loss: write the symmetric InfoNCE loss")
