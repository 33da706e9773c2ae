"""
Exercise key_remap: load someone else's checkpoint by renaming its keys to this model's.

Read: TinyCLIP (Wu et al. 2023, https://arxiv.org/abs/2309.12314) and its released checkpoints
(https://github.com/wkcn/TinyCLIP); open_clip src/open_clip/factory.py, load_checkpoint, which strips DDP's
"module." (https://github.com/mlfoundations/open_clip); nanoGPT model.py, from_pretrained, the same job for GPT-2.

    python exercises.py check key_remap
    python exercises.py hint key_remap

You will need: from checkpoints import TINYCLIP_WRAPPERS (the prefixes TinyCLIP wraps its towers in).
"""


def key_remap(key):
    """One checkpoint key -> this model's name for the same tensor (the OpenAI / open_clip layout).

    This model (and open_clip, and OpenAI's release) calls its tensors "visual.conv1.weight",
    "transformer.resblocks.0.attn.in_proj_weight", "logit_scale", ... TinyCLIP's releases wrap each tower, and
    training with DistributedDataParallel (DDP) adds "module." in front:
        "_image_encoder.module.visual.conv1.weight"     -> "visual.conv1.weight"
        "_text_encoder.module.token_embedding.weight"   -> "token_embedding.weight"
        "_logit_scale.module.logit_scale"               -> "logit_scale"
        "module.image_encoder_without_ddp.visual.proj"  -> "visual.proj"   (a second spelling)
        "module.visual.proj"                            -> "visual.proj"   (any model saved under DDP)
        "visual.proj"                                   -> "visual.proj"   (open_clip: unchanged)
    Returns the new key (a str).
    """
    # YOUR CODE HERE (about 7 lines)
    raise NotImplementedError("key_remap: rename one key")
