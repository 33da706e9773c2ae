"""
Reading and writing checkpoint files. TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives,
Hugging Face CLIPModel directories and safetensors files, and this project's own checkpoints are each read by one
small reader, their keys renamed to the OpenAI layout (convert_state_dict), and build_model makes the CLIP from them:
the architecture read from the tensor shapes (or a given config checked against them), then one strict load.

References: openai/CLIP clip/clip.py (load) and model.py (build_model), open_clip factory.py (load_checkpoint) and
convert.py, transformers' CLIPModel key names (models/clip/modeling_clip.py), TinyCLIP's checkpoint releases
(https://github.com/wkcn/TinyCLIP), the safetensors format (https://github.com/huggingface/safetensors).
"""
import json
import math
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from model import CLIP, CLIPConfig, TextConfig, VisionConfig

CONFIGS = Path(__file__).resolve().parent / "model_configs"  # the shipped configs (open_clip JSON layout)


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read or does not fit the model (the message says why)."""


__all__ = ["load_checkpoint", "save_checkpoint", "atomic_save", "torch_load", "is_torchscript", "read_safetensors",
           "convert_state_dict", "infer_config", "build_model", "read_checkpoint", "Weights", "CheckpointError"]

# -----------------------------------------------------------------------------
# Key names: TinyCLIP releases, open_clip / OpenAI state dicts, OpenAI TorchScript archives, Hugging Face CLIPModel
# directories and this project's own files all end up in the flat OpenAI layout.


# Hugging Face CLIPModel -> OpenAI names. q/k/v are fused and the projections transposed in convert_state_dict.
HF_TO_OPENAI = [  # (HF substring, OpenAI substring), applied in order
    ("vision_model.embeddings.patch_embedding.stem.", "visual.stem."),  # MiniCLIP's conv stem (export.py)
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


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path, metadata=False):
    """A .safetensors file is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}
    and the raw little-endian tensor bytes; reading it needs no extra package. metadata=True: (tensors, the
    header's "__metadata__" {str: str}, where export.py writes our config)."""
    raw = bytearray(Path(path).read_bytes())
    if len(raw) < 8:
        raise CheckpointError(f"{path}: {len(raw)} bytes, too short for a safetensors file (it starts with 8 bytes "
                              "that give the header length); save or download it again")
    n = int.from_bytes(raw[:8], "little")
    if 8 + n > len(raw):
        raise CheckpointError(f"{path}: the safetensors header length {n} is past the end of the file "
                              f"({len(raw)} bytes): the file is truncated or not a safetensors file")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, found {type(header).__name__}")
    tensors = {name: safetensors_tensor(raw, 8 + n, name, info, path)
               for name, info in header.items() if name != "__metadata__"}
    return (tensors, header.get("__metadata__") or {}) if metadata else tensors


def safetensors_tensor(raw, start, name, info, path):
    """One tensor of a safetensors file whose data begin at raw[start]. Its header entry is checked first:
    a known dtype, and data_offsets [begin, end) inside the data holding exactly the shape's bytes."""
    where = f"{path}: tensor {name!r}"
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise CheckpointError(f"{where}: the header entry must be {{dtype, shape, data_offsets}}, found {info!r:.80}")
    dtype, shape, offsets = SAFETENSORS_DTYPES.get(str(info["dtype"])), info["shape"], info["data_offsets"]
    size = len(raw) - start  # bytes of tensor data
    if dtype is None:
        raise CheckpointError(f"{where}: dtype {info['dtype']!r:.20} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    if not (naturals(shape) and naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] <= size):
        raise CheckpointError(f"{where}: shape {shape!r:.40} or data_offsets {offsets!r:.40} are not valid for "
                              f"{size} bytes of data: the file is truncated or damaged")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                              f"{shape} of {info['dtype']} needs {nbytes}: the file is damaged")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)  # torch.frombuffer refuses to read zero bytes
    return torch.frombuffer(raw, dtype=dtype, offset=start + offsets[0], count=nbytes // dtype.itemsize).reshape(shape)


def naturals(x):
    """True for a list of non-negative ints, as a safetensors shape or data_offsets must be."""
    return isinstance(x, list) and all(type(i) is int and i >= 0 for i in x)


def read_json_object(path, text=None):
    """A JSON file that must hold one object {...} (text: its content, already read; path then names the place)."""
    try:
        d = json.loads(Path(path).read_text() if text is None else text)
    except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object {{...}}, found {type(d).__name__}")
    return d


def hf_config(path):
    """CLIPConfig from a Hugging Face config.json (transformers' defaults fill keys that are absent)."""
    d = read_json_object(path)
    v, t = ({} if d.get(key) is None else d[key] for key in ("vision_config", "text_config"))
    for key, sub in (("vision_config", v), ("text_config", t)):
        if not isinstance(sub, dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object {{...}}, found {type(sub).__name__}")
    try:
        return hf_towers(d, v, t)
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a value of the wrong type, or a config check failed
        raise CheckpointError(f"{path}: {e}") from None


def hf_towers(d, v, t):
    """The CLIPConfig of config.json's top level d and its vision (v) and text (t) parts."""
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}  # transformers default: quick_gelu
    if not acts <= {"gelu", "quick_gelu"} or len(acts) != 1:
        raise ValueError(f"hidden_act {sorted(acts)} is not supported (need one of gelu, quick_gelu for both towers)")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if eps != {1e-5}:
        raise ValueError(f"layer_norm_eps {sorted(eps)} is not supported (CLIP uses 1e-5)")
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 512)
    vision = VisionConfig(image_size=v.get("image_size", 224), layers=v.get("num_hidden_layers", 12), width=vw,
                          patch_size=v.get("patch_size", 32), head_width=vw // v.get("num_attention_heads", 12),
                          mlp_ratio=mlp_ratio(v.get("intermediate_size", 3072), vw),
                          stem_channels=v.get("stem_channels", []))
    text = TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                      width=tw, heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
                      mlp_ratio=mlp_ratio(t.get("intermediate_size", 2048), tw))
    return CLIPConfig(embed_dim=d.get("projection_dim", 512), vision=vision, text=text,
                      quick_gelu=acts == {"quick_gelu"})


def is_torchscript(path):
    # TorchScript archives are zip files with a code/ folder and constants.pkl; torch.save zips have neither
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip, or a damaged one: torch_load says what is wrong
        return False


def first_sentence(e):
    """The start of an exception's message, for a one-line report (torch's messages run over many lines)."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}"


def torch_load(path):
    """torch.load with weights_only=True: tensors and plain containers only, so loading a file never runs its code.
    Every failure becomes one line that names the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), left by an interrupted save or download; "
                              "use another checkpoint or download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, probably truncated or damaged "
                                  f"({first_sentence(e)}); save or download it again") from None
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\n|$)", str(e))  # e.g. "Unsupported global: ..."
        raise CheckpointError(f"{path}: refused by weights-only loading ({found.group(1) if found else 'not tensors'})"
                              ": files that pickle Python objects other than tensors could run code when loaded; "
                              "re-save only the state dict") from None


def read_hf_directory(path):
    """d. A Hugging Face CLIPModel directory: config.json + model.safetensors or pytorch_model.bin."""
    for name, read in (("model.safetensors", read_safetensors), ("pytorch_model.bin", torch_load)):
        if (path / name).exists() and (path / "config.json").exists():
            cfg = hf_config(path / "config.json")
            sd = tensors_only(read(path / name), path / name)
            return Weights(sd, "hf", cfg, cfg.quick_gelu, f"Hugging Face CLIPModel ({name})")
    raise CheckpointError(f"{path}: a directory must hold a Hugging Face CLIPModel "
                          "(config.json + model.safetensors or pytorch_model.bin)")


def read_torchscript(path):
    """c. An OpenAI release: a TorchScript archive, of which we keep only the weights (trained with QuickGELU)."""
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the released files still are
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:  # torch.jit.load's messages run over many lines and name C++ internals
        raise CheckpointError(f"{path}: looks like a TorchScript archive (a zip with code/ and constants.pkl) but "
                              f"cannot be loaded as one ({first_sentence(e)}); download the OpenAI release again, or "
                              "save a state dict instead") from None
    return Weights(sd, "openai", None, True, "OpenAI TorchScript archive")


def read_miniclip(obj, path):
    """e. This project's own checkpoint (save_checkpoint): {'model': state dict, 'config': dict, ...}."""
    cfg = CLIPConfig.from_dict(obj["config"], source=f"{path} ['config']")
    sd = tensors_only(obj["model"], path, " ['model']")
    return Weights(sd, "openai", cfg, cfg.quick_gelu, "MiniCLIP checkpoint")


def tinyclip_name(path):
    """The shipped TinyCLIP config whose name begins the file's name, else None:
    TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt -> TinyCLIP-ViT-40M-32-Text-19M (model_configs/ has its JSON)."""
    names = [p.stem for p in CONFIGS.glob("TinyCLIP*.json")
             if path.name.startswith(p.stem) and path.name[len(p.stem):][:1] in ("-", "_", ".")]
    return max(names, key=len, default=None)


def read_state_dict(obj, path):
    """a. A TinyCLIP release ({'state_dict': ...}, towers wrapped, exact GELU; the LAION400M/YFCC15M releases are
    flat keys under one DDP "module.", told by their file name), b. a flat open_clip/OpenAI state dict (open_clip
    training checkpoints also nest it under 'state_dict'), or Hugging Face keys without config.json."""
    sd = tensors_only(obj.get("state_dict", obj), path, " ['state_dict']" if "state_dict" in obj else "")
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        return Weights(sd, "hf", None, None, "Hugging Face state dict (no config.json)")
    if any(w in k for k in sd for w in TINYCLIP_WRAPPERS):
        return Weights(sd, "openai", None, False, "TinyCLIP release (wrapped towers)")
    if name := tinyclip_name(path):  # the architecture and activation (GELU) of the config named like the file
        cfg = CLIPConfig.from_json(CONFIGS / f"{name}.json")
        return Weights(sd, "openai", cfg, cfg.quick_gelu, f"TinyCLIP release ({name}, by its file name)")
    return Weights(sd, "openai", None, None, "open_clip/OpenAI state dict")  # flat: the activation is unknown


def tensors_only(sd, path, where=""):
    """sd itself, checked to be a state dict: tensors under string keys (where: its place in the file)."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}{where}: expected a state dict (a dict of tensors), found {type(sd).__name__}; "
                              "save model.state_dict()")
    bad = [repr(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}{where}: {len(bad)} entries are not tensors ({', '.join(bad[:5])}"
                              f"{', ...' if len(bad) > 5 else ''}); a state dict holds only tensors: "
                              "save model.state_dict()")
    return sd


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
    if path.suffix == ".safetensors":
        obj, meta = read_safetensors(path, metadata=True)
        if "miniclip_config" in meta:  # written by export.py: our keys, and our config in the header
            obj = {"model": obj, "config": read_json_object(f"{path} ['miniclip_config']", meta["miniclip_config"])}
    else:
        obj = torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (a dict of tensors) or a checkpoint dict holding one, "
                              f"found {type(obj).__name__}; save model.state_dict()")
    return read_miniclip(obj, path) if "model" in obj and "config" in obj else read_state_dict(obj, path)


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


def check_finite(sd, path):
    """NaN or Inf weights (a run that diverged, a damaged file) would load and then give NaN probabilities."""
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensor{'s' * (len(bad) > 1)} hold NaN or Inf values "
                              f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): the run diverged or the file "
                              "is damaged; use an earlier checkpoint")


# -----------------------------------------------------------------------------
# Building a CLIP from a state dict in the OpenAI layout (openai/CLIP clip/model.py build_model)


def mlp_ratio(hidden, width):
    """The mlp_ratio for which model.py's int(width * mlp_ratio) gives `hidden` back (hidden / width can land a
    rounding error below it: 56 / 61 * 61 = 55.99...)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else math.nextafter(ratio, math.inf)


def infer_config(sd, quick_gelu=False, source="state dict"):
    """Builds the config from tensor shapes, as openai/CLIP's build_model does (heads = width // 64).
    The shapes cannot show the activation: quick_gelu says it."""
    def count_layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "visual.transformer.resblocks.0.mlp.c_fc.weight", "token_embedding.weight", "positional_embedding",
            "text_projection", "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: cannot infer the architecture: missing {missing} "
                              "(is this a ViT CLIP checkpoint?)")
    stem = [sd[k].shape[0] for k in sorted((k for k in sd if k.startswith("visual.stem.") and sd[k].ndim == 4),
                                            key=lambda k: int(k.split(".")[2]))]  # each conv (C_out, C_in, 3, 3)
    vw, _, patch, _ = sd["visual.conv1.weight"].shape  # (width, 3 or the stem's channels, patch, patch)
    patch *= 2 ** len(stem)  # each stem convolution halves the image
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)  # (1 + grid*grid, width)
    vocab, tw = sd["token_embedding.weight"].shape
    try:
        vision = VisionConfig(image_size=patch * grid, layers=count_layers("visual.transformer.resblocks."), width=vw,
                              patch_size=patch, head_width=64, stem_channels=stem,
                              mlp_ratio=mlp_ratio(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], vw))
        text = TextConfig(context_length=sd["positional_embedding"].shape[0], vocab_size=vocab, width=tw,
                          heads=tw // 64, layers=count_layers("transformer.resblocks."),
                          mlp_ratio=mlp_ratio(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], tw))
    except ValueError as e:  # widths below 64, or not split by heads of 64: pass a config that gives the heads
        raise CheckpointError(f"{source}: cannot infer the heads ({e}); pass a config") from None
    bias = float(sd["logit_bias"].reshape(())) if "logit_bias" in sd else None  # a SigLIP-trained model has one
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, quick_gelu=quick_gelu,
                      init_logit_bias=bias)


def compare_configs(cfg, inferred):
    """Lists config fields that the checkpoint's tensor shapes contradict (head counts cannot be seen)."""
    a, b = cfg.to_dict(), inferred.to_dict()
    pairs = [("embed_dim", a["embed_dim"], b["embed_dim"])] + [(f"{tower}.{k}", v, b[tower][k])
             for tower in ("vision_cfg", "text_cfg") for k, v in a[tower].items() if k not in ("head_width", "heads")]
    return [f"{name}: config {x}, checkpoint {y}" for name, x, y in pairs if x != y]


def load_weights(model, sd, source):
    """Strict load with one readable report of every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    problems = {"missing keys": [k for k in expected if k not in sd],
                "unexpected keys": [k for k in sd if k not in expected],
                "shape mismatches": [f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(v.shape)}"
                                     for k, v in expected.items() if k in sd and sd[k].shape != v.shape]}
    if any(problems.values()):
        lines = [f"{source}: the checkpoint does not match the model"]
        for title, items in problems.items():
            if items:  # at most 12 of each kind, then "..."
                more = ["    ..."] if len(items) > 12 else []
                lines += [f"  {title} ({len(items)}):"] + [f"    {x}" for x in items[:12]] + more
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, assign=True)  # assign: take the checkpoint's tensors instead of copying them


def build_model(sd, config=None, quick_gelu=False, source="state dict"):
    """A CLIP in eval mode holding the weights of sd, a state dict in the OpenAI layout (openai/CLIP's build_model).
    config None: the architecture is read from the tensor shapes, quick_gelu says the activation; a given CLIPConfig
    is checked against the shapes instead. source names the weights in error messages."""
    inferred = infer_config(sd, quick_gelu, source)
    if config is not None and (diffs := compare_configs(config, inferred)):
        raise CheckpointError(f"{source}: config does not match the checkpoint:\n  " + "\n  ".join(diffs))
    with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
        model = CLIP(inferred if config is None else config)
    load_weights(model, sd, source)
    return model.eval()


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
    check_finite(sd, path)  # 4. no NaN or Inf
    if config is not None and not isinstance(config, CLIPConfig):
        config = CLIPConfig.from_json(config)
    # 5. the architecture: the config given (checked against the shapes), the file's own, or read from the shapes
    model = build_model(sd, config or weights.config, bool(weights.quick_gelu), source=f"{path} ({weights.kind})")
    warn_activation(path, weights, config)  # 6. GELU or QuickGELU: assumed, or contradicted by the config
    if verbose:
        cfg = model.config
        print(f"loaded {weights.kind} from {path}: {len(sd)} tensors, {'QuickGELU' if cfg.quick_gelu else 'GELU'}, "
              f"ViT-{cfg.vision.width}w/{cfg.vision.patch_size} + text {cfg.text.width}w x {cfg.text.layers}")
    return model


def keep_as_previous(path):
    """Keeps the file now at path as <stem>.prev<suffix> (last.pt -> last.prev.pt): a hard link, a second name for
    the same bytes that costs no space, or a copy where the file system has no hard links. It is made under a
    temporary name, so an existing .prev file is only ever replaced by a complete one."""
    prev = path.with_name(f"{path.stem}.prev{path.suffix}")
    part = prev.with_name(prev.name + ".tmp")
    part.unlink(missing_ok=True)
    try:
        try:
            os.link(path, part)
        except OSError:  # no hard links here (some network and FAT drives)
            shutil.copyfile(path, part)
        os.replace(part, prev)
    finally:
        part.unlink(missing_ok=True)


def atomic_save(obj, path, keep_previous=False):
    """torch.save to path + ".tmp", then rename it over path: a run killed while saving never leaves a half-written
    file. keep_previous: the file replaced stays as <stem>.prev<suffix>. If writing fails (a full disk), the .tmp
    file is removed and the OSError says so in one line; path still holds the previous save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, had_previous = path.with_name(path.name + ".tmp"), path.exists()
    try:
        with open(tmp, "wb") as f:  # through a Python file, a full disk is OSError ENOSPC, not a torch RuntimeError
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the rename makes them the checkpoint
        if keep_previous and had_previous:
            keep_as_previous(path)  # before the rename: a complete path exists at every moment
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, an interrupt, an object that cannot be pickled: no .tmp left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        left = f"{path} still holds the previous save" if had_previous else "nothing was saved"
        error = OSError(f"cannot write {path}: {e.strerror or e}; {left}")
        error.errno = e.errno  # e.g. errno.ENOSPC; str(error) stays the one line above
        raise error from None


def save_checkpoint(path, model, keep_previous=False, **extra):
    """Writes {'model', 'config', **extra} atomically (atomic_save; keep_previous keeps the file it replaces as
    <stem>.prev<suffix>). Only tensors and plain Python containers go in, so torch.load(path, weights_only=True)
    reads it back."""
    atomic_save({"model": model.state_dict(), "config": model.config.to_dict(), **extra}, path, keep_previous)
