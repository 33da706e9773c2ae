"""
GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
https://arxiv.org/abs/2101.06983, section 3.2): the exact gradient of a contrastive loss over a large batch with the
activations of only one chunk of it in memory at a time. train.py's step uses it with --accum-chunks K.

A contrastive loss couples every image with every caption of the batch, so plain gradient accumulation (one loss per
micro-batch) would change the loss: each chunk would see only its own negatives. GradCache splits the backward pass at
the features instead, where the loss's dependence on the whole batch lives.

References: the GradCache paper and its code (https://github.com/luyug/GradCache); open_clip's --accum-freq
(https://github.com/mlfoundations/open_clip, training/train.py), which also re-encodes each chunk with a graph against
the other chunks' cached features.
"""
from contextlib import nullcontext

import torch


def chunked_backward(model, images, captions, loss_of, chunks, ctx, scaler, extra=0):
    """The gradients of the full batch's loss, loss_of(image_features, text_features, logit_scale, bias), with the
    activations of only one of `chunks` chunks of the batch in memory at a time:
    1) encode the batch chunk by chunk without a graph and keep only the features;
    2) the loss of the full batch on those features, and its gradient with respect to each feature (and to the
       temperature, and SigLIP's bias);
    3) encode each chunk again, with a graph, and backpropagate its rows of that cached gradient: the weights'
       gradients add up to those of the unchunked step.
    Exact for a model without BatchNorm; BatchNorm (the conv stem) normalises each chunk on its own, as each process's
    share under DDP. extra: rows after the batch's captions (the label prompts), encoded with the last chunk. Returns
    the loss; the gradients are in the parameters' .grad."""
    captions_per_image = (captions.shape[0] - extra) // images.shape[0]  # 1 + K
    image_chunks = images.chunk(chunks)
    sizes = [len(x) * captions_per_image for x in image_chunks]
    caption_chunks = captions.split(sizes[:-1] + [sizes[-1] + extra])
    raw = model.module if hasattr(model, "module") else model
    buffers = [b.clone() for b in raw.buffers()]
    with torch.no_grad(), ctx:  # 1)
        cached = [model(x, t) for x, t in zip(image_chunks, caption_chunks)]
    for b, saved in zip(raw.buffers(), buffers):  # 1) must not move BatchNorm's running statistics: 3) will
        b.copy_(saved)
    image_features = torch.cat([c[0] for c in cached]).float().requires_grad_()  # (B, D)
    text_features = torch.cat([c[1] for c in cached]).float().requires_grad_()  # (B * (1 + K) + extra, D)
    logit_scale = cached[0][2].float().requires_grad_()
    bias = None if raw.logit_bias is None else raw.logit_bias.detach().float().requires_grad_()
    loss = loss_of(image_features, text_features, logit_scale, bias)  # 2)
    if not torch.isfinite(loss):
        return loss
    scaler.scale(loss).backward()
    image_grads = image_features.grad.split([len(x) for x in image_chunks])
    text_grads = text_features.grad.split([len(t) for t in caption_chunks])
    for i, (x, t) in enumerate(zip(image_chunks, caption_chunks)):  # 3)
        last = i == len(image_chunks) - 1  # DDP averages the gradients across processes once, after the last chunk
        with model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext():
            with ctx:
                chunk_image, chunk_text, chunk_scale = model(x, t)
            pairs = [(chunk_image, image_grads[i]), (chunk_text, text_grads[i])]
            if last:  # the temperature's and the bias's gradients, once
                pairs.append((chunk_scale, logit_scale.grad))
                if bias is not None:
                    pairs.append((raw.logit_bias, bias.grad))
            pairs = [(out.float(), grad) for out, grad in pairs if out.requires_grad]  # a locked tower has none
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return loss


