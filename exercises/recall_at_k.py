"""
Exercise recall_at_k: how CLIP's retrieval is scored, image -> text and text -> image, with five captions per image.

Read: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), the appendix, Table 13 (zero-shot retrieval
on Flickr30k and MSCOCO); Karpathy & Fei-Fei 2015, https://arxiv.org/abs/1412.2306, section 4 (the R@K protocol);
LAION CLIP_benchmark clip_benchmark/metrics/zeroshot_retrieval.py (https://github.com/LAION-AI/CLIP_benchmark).

    python exercises.py check recall_at_k
    python exercises.py hint recall_at_k

You will need: import numpy as np; import torch.
"""


def recall_at_k(image_features, text_features, caption_image, ks=(1, 5, 10)):
    """Recall@k in both directions, as fractions in [0, 1].

    image_features: (n_images, d) numpy float32, L2-normalised. text_features: (n_captions, d), the same.
    caption_image: (n_captions,) numpy ints, the index of each caption's image. Every image has several captions
    (5 in Flickr and COCO), and they need not be next to each other.

    text -> image: each caption queries all images; a hit at k if its image is among the k most similar images.
        Averaged over the captions.
    image -> text: each image queries all captions; a hit at k if ANY of its captions is among the k most similar.
        Averaged over the images.
    Returns {"text_to_image": {"R@1": ..., "R@5": ..., "R@10": ...}, "image_to_text": {...}} (keys f"R@{k}").
    """
    # YOUR CODE HERE (about 12 lines)
    raise NotImplementedError("recall_at_k: write Recall@K both ways")
