"""
A complete CLIP written by hand: a Vision Transformer image tower and a causal Transformer text tower
that embed images and captions into one space (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", https://arxiv.org/abs/2103.00020, section 2.4 "Choosing and Scaling
a Model").

References:
1) openai/CLIP clip/model.py (VisionTransformer, CLIP): https://github.com/openai/CLIP
2) open_clip (module and key names): https://github.com/mlfoundations/open_clip
3) TinyCLIP (Wu et al., ICCV 2023, https://arxiv.org/abs/2309.12314): same architecture, GELU activation
4) nanoGPT model.py for the style: https://github.com/karpathy/nanoGPT

Module names follow the OpenAI/open_clip checkpoint keys (visual.conv1, transformer.resblocks.0.attn.in_proj_weight,
ln_final, text_projection, logit_scale, ...), so those checkpoints load without renaming. Reading the other file
layouts (TinyCLIP, Hugging Face, TorchScript, ...), renaming their keys and building a CLIP from a state dict's
tensor shapes (openai/CLIP's build_model) is checkpoints.py's job.
"""
import json
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Configs: small dataclasses filled from the open_clip-style JSON files in model_configs/


@dataclass
class VisionConfig:
    image_size: int = 224  # input resolution (square)
    layers: int = 12  # number of residual attention blocks
    width: int = 768  # token width of the ViT
    patch_size: int = 32  # side of the square patches; grid = image_size // patch_size
    head_width: int = 64  # width of one attention head; heads = width // head_width
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    stem_channels: list = field(default_factory=list)  # early convolutions before the patches ([]: none, as CLIP)

    def __post_init__(self):  # Attention splits the width into heads = width // head_width equal parts
        heads = self.width // self.head_width if self.head_width > 0 else 0
        if heads < 1 or self.width % heads:
            raise ValueError(f"vision_cfg: width {self.width} and head_width {self.head_width} give {heads} heads "
                             "(width // head_width), which must be at least 1 and divide the width")
        self.stem_channels = list(self.stem_channels)
        if self.patch_size % 2 ** len(self.stem_channels):
            raise ValueError(f"vision_cfg: {len(self.stem_channels)} stride-2 stem convolutions (stem_channels) "
                             f"need a patch_size divisible by {2 ** len(self.stem_channels)}, got {self.patch_size}")


@dataclass
class TextConfig:
    context_length: int = 77  # number of token positions (SOT + 75 tokens + EOT)
    vocab_size: int = 49408  # BPE vocabulary; the last id (49407) is the EOT token
    width: int = 512  # token width of the text Transformer
    heads: int = 8  # attention heads
    layers: int = 12  # residual attention blocks
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width

    def __post_init__(self):
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"text_cfg: width {self.width} is not divisible by heads {self.heads}")


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # joint embedding size (output of both projections)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # True for OpenAI's weights, False (exact GELU) for TinyCLIP and open_clip
    init_logit_scale: float = math.log(1 / 0.07)  # the temperature's start, in log space (CLIP section 2.5)
    init_logit_bias: float | None = None  # a learnable logit bias, for the SigLIP loss (its paper: -10); None: none

    @classmethod
    def from_dict(cls, d, source="config"):
        """Reads the open_clip JSON layout: embed_dim, quick_gelu (optional), vision_cfg {...}, text_cfg {...}.
        An unknown key, a bad head count (both refused by the dataclasses) or a missing key: a ValueError naming d."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object {{...}}, found {type(d).__name__}")
        rest = dict(d)
        try:
            vision, text = VisionConfig(**rest.pop("vision_cfg")), TextConfig(**rest.pop("text_cfg"))
            # what is left must be embed_dim, quick_gelu and init_logit_*: CLIPConfig refuses any other key
            return cls(embed_dim=rest.pop("embed_dim"), vision=vision, text=text,
                       quick_gelu=bool(rest.pop("quick_gelu", False)), **rest)
        except ValueError as e:  # a __post_init__ check
            raise ValueError(f"{source}: {e}") from None
        except (KeyError, TypeError) as e:  # TypeError: "VisionConfig.__init__() got an unexpected keyword argument"
            problem = f"missing key {e}" if isinstance(e, KeyError) else e
            hint = " (TinyCLIP 'auto' configs describe pruned models, which are not supported)" \
                if {"mask_image", "mask_text"} & set(rest) else ""
            vision_keys, text_keys = (", ".join(f.name for f in fields(c)) for c in (VisionConfig, TextConfig))
            raise ValueError(f"{source}: {problem}{hint}; allowed keys: embed_dim, quick_gelu, init_logit_scale, "
                             f"init_logit_bias, vision_cfg {{{vision_keys}}}, text_cfg {{{text_keys}}}") from None

    @classmethod
    def from_json(cls, path):
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path} (see model_configs/ for the shipped ones)")
        except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self):
        d = {"embed_dim": self.embed_dim, "quick_gelu": self.quick_gelu,
             "vision_cfg": asdict(self.vision), "text_cfg": asdict(self.text)}
        defaults = CLIPConfig()  # the logit settings are written only where they differ (open_clip's SigLIP configs)
        return d | {k: getattr(self, k) for k in ("init_logit_scale", "init_logit_bias")
                    if getattr(self, k) != getattr(defaults, k)}


# -----------------------------------------------------------------------------
# Building blocks


class QuickGELU(nn.Module):
    # x * sigmoid(1.702 x): the GELU approximation OpenAI trained with (openai/CLIP clip/model.py).
    # TinyCLIP and open_clip's default configs use the exact nn.GELU instead.
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection. The parameter names are those of
    nn.MultiheadAttention (in_proj_weight rows stacked q, k, v; out_proj), so checkpoints load as they are."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, hd)
        # softmax(q k^T / sqrt(hd)) v; causal=True masks future tokens (the text tower, CLIP section 2.4).
        # Training in bf16 on a CPU takes PyTorch's plain ("math") kernel: its fused CPU kernel's bf16 backward is
        # ~9x slower than its fp32 one (torch 2.14), while the plain one's products are fast bf16 matmuls.
        slow_fused = q.is_cpu and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if slow_fused else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, L, hd)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_ratio, quick_gelu):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)])
        self.grad_checkpointing = False  # CLIP.set_grad_checkpointing

    def forward(self, x, causal=False):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # gradient checkpointing (Chen et al. 2016, https://arxiv.org/abs/1604.06174): keep only the block's
                # input and recompute its activations in the backward pass: less memory, one more forward
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x


def conv_stem(channels):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better",
    https://arxiv.org/abs/2106.14881, section 3): 3x3 stride-2 convolutions, each followed by BatchNorm and ReLU,
    in place of most of the patchify stem. Neighbouring windows overlap, so an edge or a corner looks the same
    wherever it falls, which a patchify stem has to learn for every offset in its patch; small ViTs then learn
    shapes in far fewer steps. OpenAI's released CLIPs have none (channels []: an empty, do-nothing stem)."""
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2020) as used by CLIP: patches -> [class] + patches -> Transformer -> class token."""

    def __init__(self, cfg: VisionConfig, embed_dim, quick_gelu):
        super().__init__()
        self.image_size = cfg.image_size
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        self.stem = conv_stem(cfg.stem_channels)  # (B, 3, H, W) -> (B, C, H / 2**n, W / 2**n); empty: unchanged
        # a stride-p convolution is the "linear projection of flattened patches"; CLIP uses no bias here
        p = cfg.patch_size // 2 ** len(cfg.stem_channels)  # after a stem, the rest of a patch's stride
        self.conv1 = nn.Conv2d(([3] + cfg.stem_channels)[-1], width, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)  # CLIP adds this LayerNorm before the Transformer (section 2.4)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def embed(self, x, positional_embedding=None):
        """Images -> the Transformer's input tokens (B, 1 + g*g, width). positional_embedding (1 + g*g, width) replaces
        self.positional_embedding: AA-CLIP runs a 336-px CLIP at 518 px with a table it resized once (aa_clip.py)."""
        pos = self.positional_embedding if positional_embedding is None else positional_embedding
        x = self.conv1(self.stem(x.to(self.conv1.weight.dtype)))  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + g*g, width)
        return self.ln_pre(x + pos.to(x.dtype))

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(x.shape)}; "
                             f"use transform.image_transform({self.image_size})")
        x = self.embed(x)
        x = self.transformer(x)  # (B, grid**2 + 1, width)
        x = self.ln_post(x[:, 0, :])  # (B, width): the class token summarises the image
        return x @ self.proj  # (B, embed_dim)


# -----------------------------------------------------------------------------
# CLIP


def eot_pool(x, tokens):
    """Each caption's features at its EOT token: x (B, L, width), tokens (B, L) -> (B, width). Under the causal mask
    EOT is the only position that has seen the whole caption (CLIP section 2.4). EOT (49407) is the largest id, so
    argmax finds it (openai/CLIP encode_text; truncation keeps EOT last)."""
    eot = tokens.argmax(dim=-1)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, width)


TEXT_BUCKETS, TEXT_BUCKET_ROWS = 4, 128  # encode_text: up to 4 length groups of at least 128 captions each


class CLIP(nn.Module):

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        vc, tc = config.vision, config.text
        self.visual = VisionTransformer(vc, config.embed_dim, config.quick_gelu)
        # text tower: attribute names match the OpenAI checkpoint keys (token_embedding, transformer, ...)
        self.transformer = Transformer(tc.width, tc.layers, tc.heads, tc.mlp_ratio, config.quick_gelu)
        self.token_embedding = nn.Embedding(tc.vocab_size, tc.width)
        self.positional_embedding = nn.Parameter(torch.empty(tc.context_length, tc.width))
        self.ln_final = nn.LayerNorm(tc.width)
        self.text_projection = nn.Parameter(torch.empty(tc.width, config.embed_dim))
        # learnable temperature, initialised to 1/0.07 and stored in log space (CLIP section 2.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        # SigLIP's learnable bias of every logit (Zhai et al. 2023, section 3); None for the softmax loss
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(torch.tensor(config.init_logit_bias))
        self.init_weights()

    def init_weights(self):
        # the initialisation of openai/CLIP clip/model.py (initialize_parameters), for training from scratch
        vc, tc = self.config.vision, self.config.text
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        towers = ((self.transformer, tc.width, tc.layers), (self.visual.transformer, vc.width, vc.layers))
        for tower, width, layers in towers:
            proj_std = width ** -0.5 * (2 * layers) ** -0.5  # residual projections scaled down with depth
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=tc.width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def set_grad_checkpointing(self, enable=True):
        """Recompute every residual block of both towers in the backward pass (open_clip's method of the same name):
        a training step's activations then take about one block's worth per tower, for ~1/3 more compute."""
        self.visual.transformer.grad_checkpointing = self.transformer.grad_checkpointing = enable

    def lock(self, tower, unlocked_layers=0):
        """Freeze the "image" or "text" tower, all but its last `unlocked_layers` residual blocks and what comes after
        them (the final LayerNorm and the projection): LiT, "locked-image text tuning" (Zhai et al. 2022,
        https://arxiv.org/abs/2111.07991, section 3; open_clip's lock_image_tower / lock_text_tower). Frozen
        parameters get requires_grad False, so the optimiser holds nothing for them and autograd records no graph
        for a frozen prefix of a tower (nothing there requires a gradient); a frozen BatchNorm stays in eval mode
        (CLIP.train). The temperature (and SigLIP's bias) stay trainable."""
        if tower == "image":
            frozen, blocks = list(self.visual.parameters()), self.visual.transformer.resblocks
            head = list(self.visual.ln_post.parameters()) + [self.visual.proj]
        else:
            frozen = [p for n, p in self.named_parameters()
                      if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")]
            blocks, head = self.transformer.resblocks, list(self.ln_final.parameters()) + [self.text_projection]
        if not 0 <= unlocked_layers <= len(blocks):
            raise ValueError(f"the {tower} tower has {len(blocks)} blocks: cannot leave {unlocked_layers} unlocked")
        for p in frozen:
            p.requires_grad_(False)
        unlocked = [p for b in blocks[len(blocks) - unlocked_layers:] for p in b.parameters()]
        for p in unlocked + (head if unlocked_layers else []):
            p.requires_grad_(True)
        self.train(self.training)
        return self

    def train(self, mode=True):
        """nn.Module.train, except that a BatchNorm whose weights are frozen (lock) stays in eval mode: its running
        statistics are part of what was locked."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()
        return self

    def encode_image(self, images, normalize=False):
        x = self.visual(images.to(self.dtype))  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        """Under the causal mask nothing after a caption's EOT reaches its EOT row (eot_pool), so a caption needs only
        its first eot + 1 positions: the padding is dropped (exact). The captions are sorted by length and run in
        groups of at least TEXT_BUCKET_ROWS, each cut to its longest caption, so short captions do not pay for the
        batch's longest (a training step with hard negatives: ~20% faster on a CPU)."""
        if tokens.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"tokens have {tokens.shape[1]} positions, but this model's context_length is "
                             f"{self.positional_embedding.shape[0]}: tokenize(texts, context_length=...)")
        eot = tokens.argmax(dim=-1)  # (B,)
        order = eot.argsort(stable=True)  # shortest first
        parts = []
        for rows in order.tensor_split(max(1, min(TEXT_BUCKETS, len(tokens) // TEXT_BUCKET_ROWS))):
            t = tokens[rows, :int(eot[rows].max()) + 1] if len(rows) else tokens[rows]  # (b, L_b)
            parts.append(self.encode_text_embeddings(self.token_embedding(t), t))  # (b, embed_dim)
        x = torch.cat(parts)[order.argsort()]  # back in the input order (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_embeddings(self, x, tokens):
        """The text tower from the token embeddings x (B, L, width) on, pooled at the EOT token of each row of tokens
        (B, L); prompt learning (CoOp, adapters.py) puts learned vectors into x in place of some word embeddings."""
        x = x + self.positional_embedding[:x.shape[1]]  # (B, L, width)
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        x = eot_pool(x, tokens)  # (B, width)
        return x @ self.text_projection  # (B, embed_dim)

    def forward(self, images, tokens):
        """Returns L2-normalised image and text features and the temperature exp(logit_scale).
        The logits are logit_scale * image_features @ text_features.T (the losses live in losses.py)."""
        image_features = self.encode_image(images, normalize=True)  # (B, embed_dim)
        text_features = self.encode_text(tokens, normalize=True)  # (B, embed_dim)
        return image_features, text_features, self.logit_scale.exp()
