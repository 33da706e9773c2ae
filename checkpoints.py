"""
Reading and writing checkpoint files. TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives,
Hugging Face CLIPModel directories and safetensors files, and this project's own checkpoints all end up as a
state dict in the OpenAI key layout, which model.py's CLIP loads without renaming.

References: openai/CLIP clip/clip.py (load) and model.py (build_model), open_clip factory.py (load_checkpoint) and
convert.py, transformers' CLIPModel key names (models/clip/modeling_clip.py), TinyCLIP's checkpoint releases
(https://github.com/wkcn/TinyCLIP), the safetensors format (https://github.com/huggingface/safetensors).
"""
import json
import warnings
import zipfile
from pathlib import Path

import torch

from model import CLIP, CheckpointError, CLIPConfig, TextConfig, VisionConfig

# -----------------------------------------------------------------------------
# Reading checkpoints: TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives,
# Hugging Face CLIPModel directories and this project's own files all end up in the flat OpenAI layout.


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
