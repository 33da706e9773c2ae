"""
Reading and writing checkpoint files. TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives,
Hugging Face CLIPModel directories and safetensors files, and this project's own checkpoints are each read by one
small reader, their keys renamed to the OpenAI layout (convert_state_dict), and model.py's build_model makes the CLIP.

References: openai/CLIP clip/clip.py (load) and model.py (build_model), open_clip factory.py (load_checkpoint) and
convert.py, transformers' CLIPModel key names (models/clip/modeling_clip.py), TinyCLIP's checkpoint releases
(https://github.com/wkcn/TinyCLIP), the safetensors format (https://github.com/huggingface/safetensors).
"""
import json
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from model import CheckpointError, CLIPConfig, TextConfig, VisionConfig, build_model, infer_config

# the public API; infer_config lives in model.py and is re-exported here
__all__ = ["load_checkpoint", "save_checkpoint", "atomic_save", "torch_load", "is_torchscript", "read_safetensors",
           "convert_state_dict", "infer_config", "read_checkpoint", "Weights", "CheckpointError"]

# -----------------------------------------------------------------------------
# Key names: TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives, Hugging Face CLIPModel
# directories and this project's own files all end up in the flat OpenAI layout.


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
                # nn.Linear stores (out, in); our projections are (in, out)
                k, v = ("visual.proj" if k.startswith("visual") else "text_projection"), v.t()
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


# -----------------------------------------------------------------------------
# Readers: one per file layout. Each returns the tensors as stored and what the file says about itself.


class Weights(NamedTuple):
    """What a checkpoint holds, before its keys are renamed (convert_state_dict)."""
    state_dict: dict  # the tensors under the file's own key names
    layout: str  # key names: 'openai' (OpenAI/open_clip, maybe wrapped, as TinyCLIP does) or 'hf' (transformers)
    config: Optional[CLIPConfig]  # the architecture when the file states it, else None (read from the shapes)
    quick_gelu: Optional[bool]  # the activation when the file tells it (True: QuickGELU, False: GELU), else None
    kind: str  # what the file is, for messages


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
            count = (end - start) // dtype.itemsize
            sd[name] = torch.frombuffer(raw, dtype=dtype, offset=start, count=count).reshape(info["shape"])
    return sd


def hf_config(path):
    """CLIPConfig from a Hugging Face config.json (transformers' defaults fill keys that are absent)."""
    d = json.loads(Path(path).read_text())
    v, t = d.get("vision_config", {}), d.get("text_config", {})
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}  # transformers default: quick_gelu
    if not acts <= {"gelu", "quick_gelu"} or len(acts) != 1:
        raise CheckpointError(f"{path}: hidden_act {sorted(acts)} is not supported "
                              "(need one of gelu, quick_gelu for both towers)")
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
    return CLIPConfig(embed_dim=d.get("projection_dim", 512), vision=vision, text=text,
                      quick_gelu=acts == {"quick_gelu"})


def is_torchscript(path):
    # TorchScript archives are zip files with a code/ folder and constants.pkl; torch.save zips have neither
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}). Files that pickle Python objects other than tensors "
                              "are refused because loading them could run code; re-save the state dict.") from None


def read_hf_directory(path):
    """d. A Hugging Face CLIPModel directory: config.json + model.safetensors or pytorch_model.bin."""
    for name, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", torch_load)):
        if (path / name).exists() and (path / "config.json").exists():
            cfg = hf_config(path / "config.json")
            return Weights(read(path / name), "hf", cfg, cfg.quick_gelu, f"Hugging Face CLIPModel ({name})")
    raise CheckpointError(f"{path}: a directory must hold a Hugging Face CLIPModel "
                          "(config.json + model.safetensors or pytorch_model.bin)")


def read_torchscript(path):
    """c. An OpenAI release: a TorchScript archive, of which we keep only the weights (trained with QuickGELU)."""
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the released files still are
        warnings.simplefilter("ignore", FutureWarning)
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    return Weights(sd, "openai", None, True, "OpenAI TorchScript archive")


def read_miniclip(obj, path):
    """e. This project's own checkpoint (save_checkpoint): {'model': state dict, 'config': dict, ...}."""
    cfg = CLIPConfig.from_dict(obj["config"], source=f"{path} ['config']")
    return Weights(obj["model"], "openai", cfg, cfg.quick_gelu, "MiniCLIP checkpoint")


def read_state_dict(obj):
    """a. A TinyCLIP release ({'state_dict': ...}, towers wrapped, exact GELU), b. a flat open_clip/OpenAI state
    dict (open_clip training checkpoints also nest it under 'state_dict'), or Hugging Face keys without config.json."""
    sd = obj.get("state_dict", obj)
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        return Weights(sd, "hf", None, None, "Hugging Face state dict (no config.json)")
    if any(w in k for k in sd for w in TINYCLIP_WRAPPERS):
        return Weights(sd, "openai", None, False, "TinyCLIP release (wrapped towers)")
    return Weights(sd, "openai", None, None, "open_clip/OpenAI state dict")  # flat: the activation is unknown


def read_checkpoint(path):
    """Reads any supported file or directory as Weights. Pickles are read with weights_only=True, so loading a
    checkpoint never runs its code."""
    path = Path(path)
    if path.is_dir():
        return read_hf_directory(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_torchscript(path):
        return read_torchscript(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return read_miniclip(obj, path) if "model" in obj and "config" in obj else read_state_dict(obj)


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


# -----------------------------------------------------------------------------
# Loading and saving


def warn_activation(path, weights, config):
    """Warns when neither the file nor a config says the activation (GELU is then assumed), or when the config
    contradicts what the file says."""
    if config is None and weights.quick_gelu is None:
        warnings.warn(f"{path} ({weights.kind}): the activation cannot be read from a flat state dict; assuming exact "
                      "GELU (open_clip/TinyCLIP). For OpenAI weights pass a config with \"quick_gelu\": true.")
    elif config is not None and weights.quick_gelu not in (None, config.quick_gelu):
        name = {True: "QuickGELU", False: "GELU"}
        warnings.warn(f"{path} ({weights.kind}) was trained with {name[weights.quick_gelu]}, but the config asks for "
                      f"{name[config.quick_gelu]}: outputs will differ")


def load_checkpoint(path, config=None, verbose=False):
    """Loads any supported checkpoint into a CLIP in eval mode, fp32.
    config: None (infer the architecture from the tensor shapes), a JSON path or a CLIPConfig.
    Shapes cannot show the activation: TinyCLIP and open_clip use exact GELU, OpenAI's weights QuickGELU.
    OpenAI archives, Hugging Face directories and our own checkpoints say which one; for a flat state
    dict pass a config (e.g. model_configs/ViT-B-32.json) or GELU is assumed, with a warning."""
    weights = read_checkpoint(path)  # 1. the tensors as stored, and what the file says about itself
    sd = convert_state_dict(weights.state_dict, weights.layout)  # 2. renamed to the OpenAI layout, fp32
    check_not_pruned(weights.state_dict.keys(), sd)  # 3. TinyCLIP 'auto' models do not fit one config
    if config is not None and not isinstance(config, CLIPConfig):
        config = CLIPConfig.from_json(config)
    # 4. the architecture: the config given (checked against the shapes), the file's own, or read from the shapes
    model = build_model(sd, config or weights.config, bool(weights.quick_gelu), source=f"{path} ({weights.kind})")
    warn_activation(path, weights, config)  # 5. GELU or QuickGELU: assumed, or contradicted by the config
    if verbose:
        cfg = model.config
        print(f"loaded {weights.kind} from {path}: {len(sd)} tensors, {'QuickGELU' if cfg.quick_gelu else 'GELU'}, "
              f"ViT-{cfg.vision.width}w/{cfg.vision.patch_size} + text {cfg.text.width}w x {cfg.text.layers}")
    return model


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
