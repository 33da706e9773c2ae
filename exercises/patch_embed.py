"""
Exercise patch_embed: an image becomes the Vision Transformer's input tokens.

Read: ViT (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929), section 3.1 and equation 1; CLIP (Radford
et al. 2021, https://arxiv.org/abs/2103.00020), section 2.4 (an extra layer norm before the Transformer);
openai/CLIP clip/model.py, VisionTransformer.forward (https://github.com/openai/CLIP).

    python exercises.py check patch_embed
    python exercises.py hint patch_embed

You will need: import torch.
"""


def patch_embed(self, x, positional_embedding=None):
    """Images -> the tokens the Transformer reads: [class] + one token per patch, plus positions, layer-normed.

    self is a model.VisionTransformer with
        self.stem: early convolutions (an empty nn.Sequential, which changes nothing, for CLIP's own models)
        self.conv1: nn.Conv2d(C, width, kernel_size=p, stride=p, bias=False), p the patch size after the stem
        self.class_embedding (width,): the learned [class] token
        self.positional_embedding (1 + g*g, width): one learned vector per place, the class token's first
        self.ln_pre: nn.LayerNorm(width)
    x: (B, 3, H, W) images; the patches form a g x g grid. positional_embedding: None, or a (1 + g*g, width) table
    to use instead of self.positional_embedding.
    Returns (B, 1 + g*g, width): the class token first, then the patches row by row (left to right, top to bottom).
    """
    # YOUR CODE HERE (about 6 lines)
    raise NotImplementedError("patch_embed: write the patch embedding")
