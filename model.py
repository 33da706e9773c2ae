"""
A complete CLIP written by hand: a Vision Transformer image tower and a causal Transformer text tower
that embed images and captions into one space (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision", https://arxiv.org/abs/2103.00020, section 2.4 "Choosing and Scaling
a Model"), plus a loader that reads TinyCLIP, open_clip, OpenAI and Hugging Face checkpoints by
remapping their keys.

References:
1) openai/CLIP clip/model.py (VisionTransformer, build_model): https://github.com/openai/CLIP
2) open_clip (module and key names): https://github.com/mlfoundations/open_clip
3) TinyCLIP (Wu et al., ICCV 2023, https://arxiv.org/abs/2309.12314): same architecture, GELU activation
4) nanoGPT model.py for the style: https://github.com/karpathy/nanoGPT

Module names follow the OpenAI/open_clip checkpoint keys (visual.conv1, transformer.resblocks.0.attn.in_proj_weight,
ln_final, text_projection, logit_scale, ...), so those checkpoints load without renaming. The few keys
that other layouts name differently are remapped in one place: `convert_state_dict` below.
"""
import json
import math
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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


@dataclass
class TextConfig:
    context_length: int = 77  # number of token positions (SOT + 75 tokens + EOT)
    vocab_size: int = 49408  # BPE vocabulary; the last id (49407) is the EOT token
    width: int = 512  # token width of the text Transformer
    heads: int = 8  # attention heads
    layers: int = 12  # residual attention blocks
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # joint embedding size (output of both projections)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # True for OpenAI's weights, False (exact GELU) for TinyCLIP and open_clip

    @classmethod
    def from_dict(cls, d, source="config"):
        """Reads the open_clip JSON layout: embed_dim, quick_gelu, vision_cfg {...}, text_cfg {...}."""
        def build(klass, sub, where):
            if not isinstance(sub, dict):
                raise ValueError(f"{source}: '{where}' must be an object, got {type(sub).__name__}")
            known = {f.name for f in fields(klass)}
            unknown = sorted(set(sub) - known)
            if unknown:
                raise ValueError(f"{source}: unknown key(s) {unknown} in '{where}'; allowed: {sorted(known)}")
            return klass(**sub)
        top = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
        unknown = sorted(set(d) - top)
        if unknown:
            hint = " (TinyCLIP 'auto' configs describe pruned models, which are not supported)" \
                if {"mask_image", "mask_text"} & set(unknown) else ""
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(top)}{hint}")
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in d:
                raise ValueError(f"{source}: missing required key '{key}'")
        return cls(embed_dim=d["embed_dim"], quick_gelu=bool(d.get("quick_gelu", False)),
                   vision=build(VisionConfig, d["vision_cfg"], "vision_cfg"),
                   text=build(TextConfig, d["text_cfg"], "text_cfg"))

    @classmethod
    def from_json(cls, path):
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path} (see model_configs/ for the shipped ones)")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})")
        return cls.from_dict(d, source=str(path))

    def to_dict(self):
        return {"embed_dim": self.embed_dim, "quick_gelu": self.quick_gelu,
                "vision_cfg": asdict(self.vision), "text_cfg": asdict(self.text)}


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
        # softmax(q k^T / sqrt(hd)) v; causal=True masks future tokens (the text tower, CLIP section 2.4)
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

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


def resize_positional(pos, grid):
    """(1 + n*n, width) positional embeddings -> (1 + grid*grid, width): the class row kept, the n x n patch
    rows resized bicubically (as open_clip's resize_pos_embed does); unchanged when n == grid."""
    n = math.isqrt(pos.shape[0] - 1)
    if n == grid:
        return pos
    patches = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, width, n, n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])  # (1 + grid*grid, width)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2020) as used by CLIP: patches -> [class] + patches -> Transformer -> class token."""

    def __init__(self, cfg: VisionConfig, embed_dim, quick_gelu):
        super().__init__()
        self.image_size = cfg.image_size
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        scale = width ** -0.5
        # a stride-p convolution is the "linear projection of flattened patches"; CLIP uses no bias here
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)  # CLIP adds this LayerNorm before the Transformer (section 2.4)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def embed(self, x):
        """Images -> the Transformer's input tokens (B, 1 + g*g, width). Images larger than image_size (a multiple of
        the patch) get the positional grid resized, as AA-CLIP runs a 336-px CLIP at 518 px (aa_clip.py)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, width, g, g)
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + g*g, width)
        return self.ln_pre(x + resize_positional(self.positional_embedding, g).to(x.dtype))

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
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self):
        # the initialisation of openai/CLIP clip/model.py (initialize_parameters), for training from scratch
        vc, tc = self.config.vision, self.config.text
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width, layers in ((self.transformer, tc.width, tc.layers), (self.visual.transformer, vc.width, vc.layers)):
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

    def encode_image(self, images, normalize=False):
        x = self.visual(images.to(self.dtype))  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        if tokens.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"tokens have {tokens.shape[1]} positions, but this model's context_length is "
                             f"{self.positional_embedding.shape[0]}: tokenize(texts, context_length=...)")
        # We pool at the EOT token, the only position that has seen the whole caption under the causal mask.
        # EOT (49407) is the largest id, so argmax finds it (openai/CLIP; truncation keeps EOT last).
        eot = tokens.argmax(dim=-1)  # (B,)
        # The causal mask also means nothing after the last EOT can reach an EOT row: drop that padding (exact, faster)
        tokens = tokens[:, :int(eot.max()) + 1] if len(tokens) else tokens  # (B, L)
        x = self.encode_text_embeddings(self.token_embedding(tokens), eot)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_embeddings(self, x, eot):
        """The text tower from the token embeddings x (B, L, width) on, pooled at positions eot (B,); prompt
        learning (CoOp, adapters.py) puts learned vectors into x in place of some word embeddings."""
        x = x + self.positional_embedding[:x.shape[1]]  # (B, L, width)
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, width)
        return x @ self.text_projection  # (B, embed_dim)

    def forward(self, images, tokens):
        """Returns L2-normalised image and text features and the temperature exp(logit_scale).
        The logits are logit_scale * image_features @ text_features.T (the loss lives in train.py)."""
        return self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True), self.logit_scale.exp()


# -----------------------------------------------------------------------------
# Reading checkpoints: TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives,
# Hugging Face CLIPModel directories and this project's own files all end up in the flat OpenAI layout.


class CheckpointError(ValueError):
    pass


# Hugging Face CLIPModel -> OpenAI names. q/k/v are fused and the projections transposed in convert_state_dict.
HF_TO_OPENAI = [  # (HF substring, OpenAI substring), applied in order
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: "layrnorm" in HF
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
]
# TinyCLIP wraps each tower (and the temperature) in its own module, and DDP adds "module." to each:
# "_image_encoder.module.visual.conv1.weight" -> "visual.conv1.weight",
# "_text_encoder.module.token_embedding.weight" -> "token_embedding.weight",
# "_logit_scale.module.logit_scale" -> "logit_scale"; "image_encoder_without_ddp." is a second spelling.
TINYCLIP_WRAPPERS = ("_image_encoder.", "_text_encoder.", "_logit_scale.",
                     "image_encoder_without_ddp.", "text_encoder_without_ddp.")
NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")  # extra entries in OpenAI's archives


def strip_wrappers(key):
    """Removes DDP's "module." and TinyCLIP's per-tower wrapper prefixes from one key."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.",) + TINYCLIP_WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return "logit_scale" if key.endswith("logit_scale") else key


def convert_state_dict(sd, layout):
    """Maps a state dict of the given layout ('openai' flat/TinyCLIP/own, or 'hf') to our (OpenAI) key names."""
    out = {}
    for k, v in sd.items():
        if layout == "hf":
            if k.endswith("position_ids"):  # buffer that older transformers versions saved
                continue
            if ".self_attn.q_proj." in k:  # fuse q, k, v into one in_proj (the rows stacked q, k, v)
                parts = [sd.get(k.replace("q_proj", name)) for name in ("q_proj", "k_proj", "v_proj")]
                if all(t is not None for t in parts):  # else the q key stays, and the strict load reports it
                    kind = k.rsplit(".", 1)[1]  # weight or bias
                    k, v = k.replace(f"self_attn.q_proj.{kind}", f"attn.in_proj_{kind}"), torch.cat(parts)
            elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                continue
            elif k in ("visual_projection.weight", "text_projection.weight"):
                k, v = ("visual.proj" if k.startswith("visual") else "text_projection"), v.t()  # Linear stores (out, in)
            for hf, oa in HF_TO_OPENAI:
                k = k.replace(hf, oa)
        else:
            k = strip_wrappers(k)
            if k in NON_WEIGHTS or k.startswith("l0_module.") or k.endswith("attn_mask"):
                continue
        if k == "logit_scale":
            v = v.reshape(())  # some checkpoints store it with shape [1]
        out[k] = v.detach().float().contiguous()
    return out


def infer_config(sd, quick_gelu=False):
    """Builds the config from tensor shapes, as openai/CLIP's build_model does (heads = width // 64)."""
    def count_layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "token_embedding.weight", "positional_embedding", "text_projection", "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"cannot infer the architecture: missing {missing} (is this a ViT CLIP checkpoint?)")
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    tw = sd["token_embedding.weight"].shape[1]
    vision = VisionConfig(image_size=patch * grid, layers=count_layers("visual.transformer.resblocks."), width=vw,
                          patch_size=patch, head_width=64,
                          mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vw)
    text = TextConfig(context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                      width=tw, heads=tw // 64, layers=count_layers("transformer.resblocks."),
                      mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw)
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu)


def read_safetensors(path):
    """A .safetensors file is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}
    and the raw little-endian tensor bytes; reading it needs no extra package."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    raw = bytearray(Path(path).read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    sd = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = (8 + n + o for o in info["data_offsets"])
            dtype = dtypes[info["dtype"]]
            sd[name] = torch.frombuffer(raw, dtype=dtype, offset=start, count=(end - start) // dtype.itemsize).reshape(info["shape"])
    return sd


def hf_config(path):
    """CLIPConfig from a Hugging Face config.json (transformers' defaults fill keys that are absent)."""
    d = json.loads(Path(path).read_text())
    v, t = d.get("vision_config", {}), d.get("text_config", {})
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}  # transformers default: quick_gelu
    if not acts <= {"gelu", "quick_gelu"} or len(acts) != 1:
        raise CheckpointError(f"{path}: hidden_act {sorted(acts)} is not supported (need one of gelu, quick_gelu for both towers)")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if eps != {1e-5}:
        raise CheckpointError(f"{path}: layer_norm_eps {sorted(eps)} is not supported (CLIP uses 1e-5)")
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 512)
    vision = VisionConfig(image_size=v.get("image_size", 224), layers=v.get("num_hidden_layers", 12), width=vw,
                          patch_size=v.get("patch_size", 32), head_width=vw // v.get("num_attention_heads", 12),
                          mlp_ratio=v.get("intermediate_size", 3072) / vw)
    text = TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                      width=tw, heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
                      mlp_ratio=t.get("intermediate_size", 2048) / tw)
    return CLIPConfig(embed_dim=d.get("projection_dim", 512), vision=vision, text=text, quick_gelu=acts == {"quick_gelu"})


def is_torchscript(path):
    # TorchScript archives are zip files with a code/ folder and constants.pkl; torch.save zips have neither
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path):
    """Reads any supported file or directory. Returns (state_dict, layout, config or None, quick_gelu or None,
    description). Pickles are read with weights_only=True, so loading a checkpoint never runs its code."""
    path = Path(path)
    if path.is_dir():  # d. Hugging Face CLIPModel directory
        for name, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", torch_load)):
            if (path / name).exists() and (path / "config.json").exists():
                cfg = hf_config(path / "config.json")
                return read(path / name), "hf", cfg, cfg.quick_gelu, f"Hugging Face CLIPModel ({name})"
        raise CheckpointError(f"{path}: a directory must hold a Hugging Face CLIPModel "
                              "(config.json + model.safetensors or pytorch_model.bin)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript(path):  # c. OpenAI release: a TorchScript archive; we keep only its weights
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the released files still are
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        return sd, "openai", None, True, "OpenAI TorchScript archive"
    obj = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if "model" in obj and "config" in obj:  # e. this project's own checkpoint (train.py)
        cfg = CLIPConfig.from_dict(obj["config"], source=f"{path} ['config']")
        return obj["model"], "openai", cfg, cfg.quick_gelu, "MiniCLIP checkpoint"
    if "state_dict" in obj:  # a. TinyCLIP release / open_clip training checkpoint
        obj = obj["state_dict"]
    layout = "hf" if any(k.startswith(("text_model.", "vision_model.")) for k in obj) else "openai"
    if layout == "hf":
        return obj, "hf", None, None, "Hugging Face state dict (no config.json)"
    if any(w in k for k in obj for w in TINYCLIP_WRAPPERS):
        return obj, "openai", None, False, "TinyCLIP release (wrapped towers)"  # TinyCLIP uses exact GELU
    return obj, "openai", None, None, "open_clip/OpenAI state dict"  # b. flat: the activation is unknown


def torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}). Files that pickle Python objects other than tensors "
                              "are refused because loading them could run code; re-save the state dict.") from None


def check_not_pruned(raw_keys, sd):
    """TinyCLIP 'auto' checkpoints are pruned per layer (heads, MLP width and even whole blocks differ),
    which a uniform ViT config cannot describe (TinyCLIP model.py load_pruned_model)."""
    pruned = any("l0_module" in k or k.endswith("_loga") for k in raw_keys)
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        shapes = {}
        for k, v in sd.items():
            if k.startswith(prefix):
                i, rest = k[len(prefix):].split(".", 1)
                shapes.setdefault(rest, set()).add(tuple(v.shape))
        n_layers = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        counts = {rest: sum(k.startswith(prefix) and k.endswith("." + rest) for k in sd) for rest in shapes}
        pruned |= any(len(s) > 1 for s in shapes.values()) or any(c != n_layers for c in counts.values())
    if pruned:
        raise CheckpointError(
            "this looks like a TinyCLIP 'auto' (pruned) checkpoint: its layers have different widths or are "
            "missing, which a uniform ViT config cannot describe. Use a manual-inheritance TinyCLIP release "
            "(e.g. TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt) instead.")


def compare_configs(cfg, inferred):
    """Lists config fields that the checkpoint's tensor shapes contradict (head counts cannot be seen)."""
    a, b = cfg.to_dict(), inferred.to_dict()
    diffs = [f"embed_dim: config {a['embed_dim']}, checkpoint {b['embed_dim']}"] if a["embed_dim"] != b["embed_dim"] else []
    for tower in ("vision_cfg", "text_cfg"):
        for k, v in a[tower].items():
            if k not in ("head_width", "heads") and v != b[tower][k]:
                diffs.append(f"{tower}.{k}: config {v}, checkpoint {b[tower][k]}")
    return diffs


def load_weights(model, sd, source):
    """Strict load with one readable report of every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def block(title, items):
            return [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:12]] + (["    ..."] if len(items) > 12 else [])
        lines = [f"{source}: the checkpoint does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            lines += block(title, items) if items else []
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, assign=True)  # assign: take the checkpoint's tensors instead of copying them


def load_checkpoint(path, config=None, verbose=False):
    """Loads any supported checkpoint into a CLIP in eval mode, fp32.
    config: None (infer the architecture from the tensor shapes), a JSON path or a CLIPConfig.
    Shapes cannot show the activation: TinyCLIP and open_clip use exact GELU, OpenAI's weights QuickGELU.
    OpenAI archives, Hugging Face directories and our own checkpoints say which one; for a flat state
    dict pass a config (e.g. model_configs/ViT-B-32.json) or GELU is assumed, with a warning."""
    raw, layout, stored, quick_gelu, kind = read_checkpoint(path)
    sd = convert_state_dict(raw, layout)
    check_not_pruned(raw.keys(), sd)
    inferred = stored or infer_config(sd, quick_gelu=bool(quick_gelu))
    if config is not None:
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_json(config)
        diffs = compare_configs(cfg, inferred)
        if diffs:
            raise CheckpointError(f"{path}: config does not match the checkpoint:\n  " + "\n  ".join(diffs))
        if quick_gelu is not None and cfg.quick_gelu != quick_gelu:
            warnings.warn(f"{path} ({kind}) was trained with {'QuickGELU' if quick_gelu else 'GELU'}, but the "
                          f"config asks for {'QuickGELU' if cfg.quick_gelu else 'GELU'}: outputs will differ")
    else:
        cfg = inferred
        if quick_gelu is None:
            warnings.warn(f"{path} ({kind}): the activation cannot be read from a flat state dict; assuming exact GELU "
                          "(open_clip/TinyCLIP). For OpenAI weights pass a config with \"quick_gelu\": true.")
    with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
        model = CLIP(cfg)
    load_weights(model, sd, f"{path} ({kind})")
    if verbose:
        print(f"loaded {kind} from {path}: {len(sd)} tensors, {'QuickGELU' if cfg.quick_gelu else 'GELU'}, "
              f"ViT-{cfg.vision.width}w/{cfg.vision.patch_size} + text {cfg.text.width}w x {cfg.text.layers}")
    return model.eval()


def atomic_save(obj, path):
    """torch.save to a temporary file first, then rename it over `path`: a run killed while saving never
    leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(path, model, **extra):
    """Writes {'model', 'config', **extra} atomically (atomic_save). Only tensors and plain Python containers go
    in, so torch.load(path, weights_only=True) reads it back."""
    atomic_save({"model": model.state_dict(), "config": model.config.to_dict(), **extra}, path)
