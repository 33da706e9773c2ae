"""Bad input gets one clear line naming the file and what to do, never a raw traceback: broken .pt files, zips that
look like TorchScript, Hugging Face directories with a bad config.json, corrupt safetensors headers, NaN weights,
impossible head counts, non-dict contents. Saving never loses the previous save (atomic_save)."""
import errno
import json
import warnings
import zipfile

import pytest
import torch

import checkpoints
from checkpoints import atomic_save, CheckpointError, load_checkpoint, save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT

XS = ROOT / "model_configs" / "MiniCLIP-XS-32px.json"


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    return CLIP(CLIPConfig.from_json(XS)).state_dict()


def one_line(msg, path):
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg, msg


# ----------------------------------------------------------------------------- writers of bad files


def raw(name, data):
    def write(d, sd):
        (d / name).write_bytes(data)
        return d / name
    return write


def truncated_pt(d, sd):
    torch.save(sd, d / "full.pt")
    raw = (d / "full.pt").read_bytes()
    (d / "half.pt").write_bytes(raw[:len(raw) // 2])
    return d / "half.pt"


def fake_torchscript(d, sd):
    with zipfile.ZipFile(d / "fake.pt", "w") as z:
        z.writestr("x/code/a.py", "junk")
        z.writestr("x/constants.pkl", b"\x80\x02junk")
    return d / "fake.pt"


def hf_dir(config_text):
    def write(d, sd):
        (d / "hf").mkdir()
        (d / "hf" / "config.json").write_text(config_text)
        (d / "hf" / "model.safetensors").write_bytes(b"")
        return d / "hf"
    return write


def safetensors(header, data=b"\0" * 24, n=None):
    """A .safetensors file: 8-byte header length (n, default the true one), the header, the data."""
    def write(d, sd):
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        (d / "w.safetensors").write_bytes((len(raw) if n is None else n).to_bytes(8, "little") + raw + data)
        return d / "w.safetensors"
    return write


def a(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"a": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def saved(obj_of_sd):
    def write(d, sd):
        torch.save(obj_of_sd(sd), d / "obj.pt")
        return d / "obj.pt"
    return write


def non_finite(sd):
    sd = {k: v.clone() for k, v in sd.items()}
    sd["visual.proj"][0, 0] = float("nan")
    sd["token_embedding.weight"][1, 2] = float("inf")
    return {"module." + k: v for k, v in sd.items()}


BAD = [  # (id, writer, words the message must hold besides the path)
    ("empty-pt", raw("empty.pt", b""), ["empty"]),
    ("truncated-pt", truncated_pt, ["truncated"]),
    ("fake-torchscript", fake_torchscript, ["TorchScript"]),
    ("hf-config-not-json", hf_dir("{oops"), ["config.json", "not valid JSON"]),
    ("hf-config-list", hf_dir("[1, 2]"), ["config.json", "JSON object", "list"]),
    ("hf-vision-config-str", hf_dir('{"vision_config": "big"}'), ["config.json", "vision_config", "JSON object"]),
    ("hf-heads", hf_dir('{"vision_config": {"hidden_size": 100, "num_attention_heads": 3}}'), ["config.json", "100"]),
    ("st-empty-file", raw("w.safetensors", b""), ["8 bytes"]),
    ("st-short", raw("w.safetensors", b"abc"), ["8 bytes"]),
    ("st-empty-header", safetensors(b"", data=b""), ["header", "JSON"]),
    ("st-not-json", safetensors(b"{oops"), ["header", "JSON"]),
    ("st-header-list", safetensors([1, 2]), ["header", "JSON object"]),
    ("st-length-past-end", safetensors(a(), n=10 ** 6), ["1000000", "past the end"]),
    ("st-unknown-dtype", safetensors(a(dtype="F8_E9")), ["'a'", "F8_E9"]),
    ("st-offsets-past-end", safetensors(a(offsets=(0, 1000))), ["'a'", "data_offsets", "1000"]),
    ("st-offsets-vs-shape", safetensors(a(offsets=(0, 16))), ["'a'", "16 bytes", "24"]),
    ("st-offsets-bad", safetensors(a(offsets="x")), ["'a'", "data_offsets"]),
    ("st-entry-not-dict", safetensors({"a": 3}), ["'a'"]),
    ("non-finite", saved(non_finite), ["2 tensors", "visual.proj", "token_embedding.weight", "NaN"]),
    ("tensor", saved(lambda sd: torch.zeros(3)), ["Tensor", "state dict"]),
    ("list", saved(lambda sd: [1, 2]), ["list", "state dict"]),
    ("non-tensor-values", saved(lambda sd: {**sd, "epoch": 3, "note": "x"}), ["epoch", "note"]),
    ("state-dict-list", saved(lambda sd: {"state_dict": [1, 2]}), ["'state_dict'", "list"]),
    ("miniclip-model-list", saved(lambda sd: {"model": [1], "config": json.loads(XS.read_text())}),
     ["'model'", "list"]),
]


@pytest.mark.parametrize("write, needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line(write, needles, state_dict, tmp_path):
    path = write(tmp_path, state_dict)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    one_line(msg, path)
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("vision, text, needles", [
    ({"head_width": 33, "width": 100}, {}, ["width 100", "head_width 33"]),
    ({"head_width": 128}, {}, ["width 64", "head_width 128"]),
    ({}, {"heads": 3}, ["width 64", "heads 3"]),
    ({}, {"heads": 0}, ["heads 0"]),
])
def test_config_heads_must_divide_width(vision, text, needles, tmp_path):
    cfg = json.loads(XS.read_text())
    cfg["vision_cfg"].update(vision)
    cfg["text_cfg"].update(text)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        CLIPConfig.from_json(tmp_path / "c.json")
    one_line(str(e.value), tmp_path / "c.json")
    for n in needles:
        assert n in str(e.value)


@pytest.mark.parametrize("file_name, config, nested", [
    ("TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt", "TinyCLIP-ViT-40M-32-Text-19M", False),
    ("TinyCLIP-ViT-8M-16-Text-3M-YFCC15M.pt", "TinyCLIP-ViT-8M-16-Text-3M", True),
])
def test_tinyclip_release_is_recognised_by_its_name(file_name, config, nested, tmp_path):
    """The LAION400M/YFCC15M releases are flat open_clip keys under one DDP "module.": only the name says TinyCLIP."""
    cfg = CLIPConfig.from_json(ROOT / "model_configs" / f"{config}.json")
    sd = {"module." + k: v for k, v in CLIP(cfg).state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1} if nested else sd, tmp_path / file_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_checkpoint(tmp_path / file_name)
    assert model.config == cfg and model.config.quick_gelu is False


def test_warnings_are_one_line(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "flat.pt")
    with pytest.warns(UserWarning) as record:
        load_checkpoint(tmp_path / "flat.pt")
    save_checkpoint(tmp_path / "own.pt", CLIP(CLIPConfig.from_json(XS)))
    quick = CLIPConfig.from_json(XS)
    quick.quick_gelu = True
    with pytest.warns(UserWarning) as more:
        load_checkpoint(tmp_path / "own.pt", config=quick)
    for w in list(record) + list(more):
        assert "\n" not in str(w.message), str(w.message)


# ----------------------------------------------------------------------------- saving


def disk_full(obj, f):
    f.write(b"PK\x03\x04 half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError) as e:
        atomic_save({"step": 2}, path, keep_previous=True)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"cannot write {path}: No space left on device; {path} still holds the previous save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_failed_first_save_says_nothing_was_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"^cannot write .*last\.pt: No space left on device; nothing was saved$"):
        atomic_save({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("links", [True, False])
def test_keep_previous(links, tmp_path, monkeypatch):
    if not links:  # a file system without hard links: the previous save is copied instead
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(checkpoints.os, "link", no_link)
    path, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    atomic_save({"step": 1}, path, keep_previous=True)
    assert not prev.exists()
    for step in (2, 3):
        atomic_save({"step": step}, path, keep_previous=True)
        assert torch.load(path, weights_only=True) == {"step": step}
        assert torch.load(prev, weights_only=True) == {"step": step - 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_save_checkpoint_keeps_previous(tmp_path):
    model = CLIP(CLIPConfig.from_json(XS))
    for step in (1, 2):
        save_checkpoint(tmp_path / "last.pt", model, keep_previous=True, step=step)
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["step"] == 1
    assert "keep_previous" not in torch.load(tmp_path / "last.pt", weights_only=True)


def test_failed_pickling_leaves_no_tmp(tmp_path):
    with pytest.raises(Exception):
        atomic_save({"f": lambda: 0}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
