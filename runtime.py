"""
Where and how a model runs: the device, the processes (torchrun), the mixed-precision context, and the run log
(metrics.jsonl).

Every entry point uses these (train.py, adapters.py, aa_clip.py, test.py, evaluate.py), so this file imports nothing
of the project. Mixed precision follows PyTorch's automatic mixed precision recipe
(https://pytorch.org/docs/stable/amp.html): fp32 master weights, matmuls in bf16/fp16 under torch.autocast.
"""
import argparse
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist


def pick_device(name=None, local_rank=0):
    """The device named (cuda, cuda:1, mps, cpu), else the best available: this process's GPU, Apple's MPS, the CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name}: not a device (examples: cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available to this PyTorch; use --device cpu")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ["auto", "fp32", "bf16", "fp16"]  # the --precision choices of every entry point


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): there a bf16 matmul runs ~3-4x an fp32
    one; without it PyTorch emulates bf16 and it is slower than fp32. Asked of the CPU, not guessed from its name."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probes):
        return any(probe() for probe in probes if probe)
    try:  # older PyTorch: the kernel's flag list (Linux)
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device, requested="auto"):
    """The precision a run uses and why, as (precision, reason). "auto": bf16 autocast where the hardware
    multiplies bf16 natively (CUDA GPUs that support it, CPUs with AVX-512 BF16/AMX), fp32 otherwise; any other
    value is forced. bf16 keeps fp32's exponent range, so it needs no loss scaling (fp16 does)."""
    device = torch.device(device)
    if requested not in (None, "auto"):
        return requested, "forced by --precision"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16", "auto: this CPU has native bf16 (AVX-512 BF16/AMX)"
    return "fp32", f"auto: no native bf16 on this {device.type}"


def precision_line(device, requested="auto"):
    """resolve_precision's choice, printed as a run's first line; returns the precision."""
    precision, why = resolve_precision(device, requested)
    print(f"precision: {precision} ({why})")
    return precision


def default_precision(device):
    """The precision "auto" picks on this device."""
    return resolve_precision(device)[0]


def autocast_context(device, precision):
    """Mixed precision keeps fp32 master weights and runs matmuls in bf16/fp16 (never .half() the model:
    plain fp16 weights and Adam give NaNs, openai/CLIP issue #40); LayerNorm, softmax and the losses stay fp32
    under autocast's own rules. fp16 also needs a GradScaler."""
    device = torch.device(device)
    if precision in (None, "auto"):
        precision = default_precision(device)
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs a GPU (CPU LayerNorm has no fp16 kernel); use bf16 or fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def log_metrics(out, record):
    """Appends one JSON line to OUT/metrics.jsonl (plot.py reads it)."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without it this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def equalise_batch(images, tokens, world):
    """A skipped unreadable image makes one process's batch smaller; all_gather needs equal sizes, so every
    process trims its batch to the smallest one."""
    if world == 1:
        return images, tokens
    n = torch.tensor([images.shape[0]], device=images.device if images.is_cuda else "cpu")
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return images[:n.item()], tokens[:n.item()]


# -----------------------------------------------------------------------------
# Command lines: flag types that refuse pointless values at parse time, and errors and warnings as one plain line


def int_at_least(low):
    """An argparse type: an integer >= low (e.g. int_at_least(2) for a contrastive batch), else a usage error."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # what argparse names in "invalid ... value"
    return parse


def error_line(e):
    """One line for an error: a DataLoader worker's exception arrives wrapped in the worker's traceback
    ("Caught ImageLoadError in DataLoader worker process 0. Original Traceback ..."); keep the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]  # "transform.ImageLoadError: cannot read ..." -> the message
    return " ".join(text.split())


def plain_warnings():
    """Warnings print as one line "warning: ...", without the file name and source line Python adds."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
