"""
The contrastive losses of CLIP training, each written once: CLIP's symmetric InfoNCE with NegCLIP's hard-negative
columns (clip_loss), SigLIP's sigmoid pairs (siglip_loss), each image against its own hard negatives only
(hard_negative_loss), each labelled image against all class prompts (label_prompt_loss), and gathering
features across processes so every loss sees the global batch (gather_with_grad); batch_loss combines them into the
loss of one training batch as train.py's step uses it, in fp32, on L2-normalised features.

References: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) Figure 3; NegCLIP (Yuksekgonul et al.
2023, https://arxiv.org/abs/2210.01936) section 5; SVLC (Doveh et al. 2023, https://arxiv.org/abs/2211.11733)
section 3.3; SigLIP (Zhai et al. 2023, https://arxiv.org/abs/2303.15343) section 3; UniCL (Yang et al. 2022,
https://arxiv.org/abs/2204.03610) section 3; open_clip's loss.py
(https://github.com/mlfoundations/open_clip, ClipLoss, SigLipLoss, gather_features).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def clip_loss(image_features, text_features, logit_scale, negative_features=None, negative_valid=None):
    """Symmetric InfoNCE (CLIP Figure 3): the i-th image and the i-th caption are the positive pair, every other
    pairing in the batch is a negative. Cross-entropy over each row (image -> captions) and each column
    (caption -> images) of the scaled cosine-similarity matrix, averaged. Features must be L2-normalised.
    NegCLIP (Yuksekgonul et al. 2023, section 5): hard-negative captions (N, D) are extra columns of the
    image -> caption side only, shared by the whole batch; negative_valid (N,) masks out missing ones."""
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    logits_per_text = logits_per_image.T  # (B, B)
    if negative_features is not None:
        hard = logit_scale * image_features @ negative_features.T  # (B, N)
        if negative_valid is not None:
            hard = hard.masked_fill(~negative_valid, float("-inf"))
        logits_per_image = torch.cat([logits_per_image, hard], dim=1)  # (B, B + N)
    labels = torch.arange(image_features.shape[0], device=image_features.device)  # the diagonal
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias, negative_features=None, negative_valid=None):
    """The sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", section 3 and
    Algorithm 1): every (image, caption) pair of the batch is its own binary problem, match (label +1, the diagonal)
    or not (-1), with logits logit_scale * cosine + logit_bias; -log sigmoid(label * logit) summed over the B x B
    pairs and divided by B (open_clip loss.py, SigLipLoss). No softmax couples a row, so there is nothing to
    normalise across the batch. Hard-negative captions (N, D) are extra columns labelled -1 for every image;
    negative_valid (N,) masks out missing ones."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(len(logits), device=logits.device) - 1  # (B, B): +1 on the diagonal, -1 elsewhere
    loss = -F.logsigmoid(labels * logits).sum()
    if negative_features is not None:
        hard = logit_scale * image_features @ negative_features.T + logit_bias  # (B, N), all labelled -1
        valid = torch.ones_like(hard) if negative_valid is None else negative_valid.to(hard.dtype).expand_as(hard)
        loss = loss - (F.logsigmoid(-hard) * valid).sum()
    return loss / image_features.shape[0]


def hard_negative_loss(image_features, text_features, negative_features, negative_valid, logit_scale):
    """Each image against its own caption and its own K hard negatives only: cross-entropy over 1 + K scaled cosines,
    the true caption at index 0 (the "negatives loss" of SVLC, Doveh et al. 2023, "Teaching Structured
    Vision&Language Concepts to Vision&Language Models", section 3.3). In clip_loss those K captions are a few of
    B + B*K columns and every easy column dilutes them; here they are all there is, so the only way down is to rank
    "a red star left of a blue circle" above "a blue circle left of a red star" for this image. Features are
    L2-normalised: image (B, D), caption (B, D), negatives (B, K, D); negative_valid (B, K) masks missing ones."""
    positive = (image_features * text_features).sum(dim=-1, keepdim=True)  # (B, 1)
    negative = torch.einsum("bd,bkd->bk", image_features, negative_features)  # (B, K)
    present = F.pad(negative_valid, (1, 0), value=True)  # (B, 1 + K): the caption itself is always there
    logits = (logit_scale * torch.cat([positive, negative], dim=1)).masked_fill(~present, float("-inf"))  # (B, 1 + K)
    labels = torch.zeros(image_features.shape[0], dtype=torch.long, device=image_features.device)
    return F.cross_entropy(logits, labels)


def label_prompt_loss(image_features, prompt_features, labels, logit_scale):
    """Each labelled image against the prompts of all C classes ("a circle", "a square", ...; label_prompts.py):
    cross-entropy over C scaled cosines, the image's class the target. This is the image -> text side of UniCL's
    loss (Yang et al. 2022, section 3.1) with every class in every batch: supervised classification whose class
    vectors are the text tower's features of the prompts. Features are L2-normalised: image (B, D), prompts (C, D);
    labels (B,) with -1 for images whose caption names no single class (left out; no labelled image: 0)."""
    logits = logit_scale * image_features @ prompt_features.T  # (B, C)
    labelled = labels >= 0
    if not labelled.any():
        return logits.sum() * 0  # a zero that keeps the graph (and the gradients' shapes) as they are
    return F.cross_entropy(logits[labelled], labels[labelled])


def gather_with_grad(x):
    """All processes' features, concatenated in rank order, so the loss sees the global batch as negatives.
    torch.distributed.nn.all_gather passes gradients back to each process's own shard (a plain dist.all_gather
    would cut the graph). Every process then computes the same global loss; DDP averages the gradients, which
    gives exactly the single-process gradient on the global batch (open_clip loss.py, gather_with_grad)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn  # registers the autograd-aware collectives
    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)  # (world * B, D)


# -----------------------------------------------------------------------------
# The loss of one training batch: the formulas above, combined as train.py's step uses them


def batch_loss(image_features, text_features, logit_scale, logit_bias, tokens, hard_negative_weight, prompts=None):
    """The loss of one batch from this process's features (gathered here, so it is the global batch's loss): image
    (B, D) and caption features (B * (1 + K), D) in fp32, tokens (B, L) or (B, 1 + K, L) as in train.train_step.
    clip_loss, or siglip_loss for a model with a logit bias, plus hard_negative_weight x hard_negative_loss with
    K > 0. prompts (LabelPrompts): the last C rows of text_features are its prompts', and prompts.weight x
    label_prompt_loss of the global batch's images is added."""
    prompt_features = None
    if prompts is not None:  # the same C prompt features on every process: nothing to gather
        text_features, prompt_features = text_features[:-len(prompts)], text_features[-len(prompts):]  # (C, D)
        labels = gather_with_grad(prompts.labels(tokens if tokens.ndim == 2 else tokens[:, 0]).float()).long()
    B = image_features.shape[0]
    image_features, negatives, valid = gather_with_grad(image_features), None, None
    if tokens.ndim == 2:
        positives = gather_with_grad(text_features)  # (world * B, D)
    else:
        text_features = text_features.view(B, tokens.shape[1], -1)  # (B, 1 + K, D)
        positives = gather_with_grad(text_features[:, 0])  # (world * B, D)
        negatives = gather_with_grad(text_features[:, 1:].flatten(0, 1))  # (world * B * K, D)
        valid = gather_with_grad(tokens[:, 1:].flatten(0, 1).any(dim=-1).float()) > 0  # (world * B * K,)
    if logit_bias is None:
        loss = clip_loss(image_features, positives, logit_scale, negatives, valid)
    else:
        loss = siglip_loss(image_features, positives, logit_scale, logit_bias, negatives, valid)
    if negatives is not None and hard_negative_weight:
        K = tokens.shape[1] - 1
        own = negatives.view(-1, K, negatives.shape[-1]), valid.view(-1, K)  # (world * B, K, D), (world * B, K)
        loss = loss + hard_negative_weight * hard_negative_loss(image_features, positives, *own, logit_scale)
    if prompt_features is not None:
        loss = loss + prompts.weight * label_prompt_loss(image_features, prompt_features, labels, logit_scale)
    return loss
