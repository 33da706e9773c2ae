"""
Zero-shot image <-> text retrieval: Recall@K on a caption test split (Flickr8k/30k, COCO, or the built-in shapes).

The protocol of the CLIP paper's zero-shot Flickr30k / MSCOCO retrieval results (Radford et al. 2021,
https://arxiv.org/abs/2103.00020), as computed by LAION's CLIP_benchmark (clip_benchmark/metrics/zeroshot_retrieval.py):
  1) encode every image once and every caption once, L2-normalise; similarity = cosine = dot product
  2) text -> image ("image retrieval"): each caption queries all images. A hit at k if its image is among
     the k most similar images. Averaged over captions (5,000 for a 1K-image test set).
  3) image -> text ("text retrieval"): each image queries all captions. A hit at k if ANY of its captions is
     among the k most similar captions. Averaged over images.
Protocols: "5cap" keeps every caption of each image (5 for Flickr and COCO): the paper's numbers. "1cap" keeps only
the first caption, as the MiniClip Flickr tutorial this project follows does (its en_val.json evaluation). Its numbers
are not comparable: one caption instead of five costs about 20 points of image -> text R@1 (openai/CLIP issue #115).

Ties. Equal scores happen for real: duplicated images, and identical captions (COCO has many "A man riding a wave
on a surfboard."). We break them by index, lower first, so the numbers do not depend on the search library.
FAISS does not promise that order (faiss 1.15 returns tied items highest index first, and at the cut-off k it may
keep any of them), so faiss_ranked() re-sorts ties and re-searches the rare rows where a tie straddles the cut.
brute_force_recall() computes the same definition from the full similarity matrix; the tests hold the two equal.

References: FAISS (Johnson et al. 2017, https://arxiv.org/abs/1702.08734; https://github.com/facebookresearch/faiss),
CLIP_benchmark (https://github.com/LAION-AI/CLIP_benchmark).

Command line: python test.py retrieval --checkpoint CKPT --data CAPTIONS --images DIR (see test.py).
"""
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import CaptionEvalDataset, check_images, make_loader
from runtime import autocast_context, error_line
from tokenizer import count_tokens, tokenize
from transform import ImageLoadError, image_transform

try:
    import faiss
except ImportError:  # FAISS is optional: brute_force_recall computes the same numbers with torch
    faiss = None

KS = (1, 5, 10)
PROTOCOLS = {"5cap": None, "1cap": 1}  # protocol -> captions_per_image of CaptionEvalDataset (None = all)

# -----------------------------------------------------------------------------
# Encoding: batches through a DataLoader, no autograd, autocast at the requested precision, and as many loader
# workers and torch threads as there are cores free for them (a busy machine must not make batching slower than
# the one-at-a-time loop)

SMALL_IMAGE = 128 * 128  # pixels; up to this, decoding an image costs less than a worker's start-up and hand-over


def free_cores(interval=0.05):
    """How many of the cores this process may run on (os.sched_getaffinity) nobody else is using now, at least 1.
    Linux: the idle time /proc/stat shows for those cores over `interval` seconds while we sleep, so only other
    processes count (os.getloadavg's 1-minute average would still count our own training loop that just ended).
    Elsewhere: all of them."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    names = {f"cpu{i}" for i in cores}

    def idle_and_total():  # /proc/stat: cpuN user nice system idle iowait irq softirq steal (in ticks)
        with open("/proc/stat") as f:
            ticks = [[int(t) for t in line.split()[1:9]] for line in f
                     if line.startswith("cpu") and line.split()[0] in names]
        return sum(t[3] + t[4] for t in ticks), sum(sum(t) for t in ticks)
    try:
        idle0, total0 = idle_and_total()
        time.sleep(interval)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return len(cores)
    idle_share = (idle1 - idle0) / max(1, total1 - total0)
    return max(1, min(len(cores), round(idle_share * len(cores))))


def first_image_pixels(dataset):
    """Width x height of the dataset's first image, from its header only; None when it cannot be told."""
    try:
        with Image.open(Path(dataset.image_root) / dataset.records[0].image) as image:
            return image.width * image.height
    except Exception:  # not a CaptionEvalDataset, or an unreadable file (the loader then says which)
        return None


def loader_workers(requested, dataset, device, free):
    """DataLoader worker processes for encoding `dataset` on `device` when `free` cores are free; `requested`
    (e.g. --workers N) wins when it is not None. The automatic choice:
      - small images (the first is at most 128x128, like the 64x64 Shapes PNGs): 0, decode here. One costs ~0.1 ms;
        starting workers and sending every batch back through shared memory cost more than that.
      - on a GPU, which does the matmuls: a core stays with this process, up to 4 workers decode on the others.
      - on the CPU: decoding competes with the matmuls for the same cores, and a ViT forward costs more than
        decoding its image, so only one worker per 4 free cores (none on 2 or 3)."""
    if requested is not None:
        return requested
    pixels = first_image_pixels(dataset)
    if pixels is not None and pixels <= SMALL_IMAGE:
        return 0
    if torch.device(device).type != "cpu":
        return max(0, min(4, free - 1))
    return min(4, free // 4)


def torch_threads(requested, device, free, decoding_workers=0):
    """torch threads for the matmuls on the CPU; `requested` wins when it is not None; None on a GPU (unchanged).
    Automatic: the free cores less the workers that decode big images (workers of small images mostly wait), at
    most torch's own setting (--threads or its default). More threads than free cores is the trap: a parallel
    matmul waits at each step for its slowest thread, and a thread that shares its core with another process runs
    at half speed, so all of them do. Measured (2 cores, one held by another process): 2 workers and 2 threads took
    11.4 s where the one-at-a-time loop took 4.9 s."""
    if requested is not None or torch.device(device).type != "cpu":
        return requested
    return max(1, min(torch.get_num_threads(), free - decoding_workers))


def encode_plan(workers, threads, dataset, device):
    """(workers, threads) for encoding `dataset` on `device`: the given values, None -> the automatic choice of
    loader_workers and torch_threads (cores measured once, only when something is automatic)."""
    device = torch.device(device)
    if workers is not None and (threads is not None or device.type != "cpu"):
        return workers, threads
    free = free_cores()
    workers = loader_workers(workers, dataset, device, free)
    pixels = first_image_pixels(dataset)
    decoding = workers if pixels is None or pixels > SMALL_IMAGE else 0  # workers that are busy all the time
    return workers, torch_threads(threads, device, free, decoding)


@contextmanager
def num_threads(n):
    """torch.set_num_threads(n) for the block, then back to what it was; None: unchanged."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


def _device(model, device):
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.inference_mode()  # like no_grad, and also skips autograd's version counters
def encode_images(model, dataset, batch_size=256, workers=None, device=None, progress=True, precision="auto",
                  threads=None):
    """CaptionEvalDataset -> (n_images, embed_dim) float32 numpy array of L2-normalised image features.
    workers, threads: None chooses them for the cores free now (encode_plan); precision: runtime.PRECISIONS."""
    device = _device(model, device)
    workers, threads = encode_plan(workers, threads, dataset, device)
    loader = make_loader(dataset, batch_size, train=False, workers=workers, device=device)  # pinned memory on CUDA
    features, order = [], []
    try:
        with num_threads(threads):
            for images, index in tqdm(loader, desc="encode images", disable=not progress):
                with autocast_context(device, precision):  # "auto": bf16 where the hardware has it natively
                    x = model.encode_image(images.to(device, non_blocking=True))  # (B, embed_dim)
                features.append(F.normalize(x.float(), dim=-1).cpu())  # normalise in float32, not bf16
                order.append(index)
    except ImageLoadError as e:  # from a worker it comes wrapped in the worker's traceback: keep the one line
        raise ImageLoadError(f"{error_line(e)} (evaluation reads every image: replace the file, or remove its entry "
                             "from the caption file)") from None
    assert torch.equal(torch.cat(order), torch.arange(len(dataset))), "images came back out of order"
    return torch.cat(features).numpy()


@torch.inference_mode()
def encode_texts(model, captions, batch_size=1024, device=None, progress=True, precision="auto", threads=None):
    """List of captions -> (n_captions, embed_dim) float32 numpy array of L2-normalised text features.
    Captions longer than the context are truncated (tokenize keeps EOT, which is where the text is pooled).
    threads: None chooses them for the cores free now (torch_threads); precision: runtime.PRECISIONS."""
    device = _device(model, device)
    if threads is None and device.type == "cpu":
        threads = torch_threads(None, device, free_cores())
    tokens = tokenize(captions, context_length=model.config.text.context_length)  # (N, L)
    # Encode in order of length: encode_text drops the padding after a batch's longest caption, so batches of
    # similar lengths do much less work. The features are put back in caption order at the end.
    order = tokens.argmax(dim=-1).argsort()
    features = torch.empty(len(captions), model.config.embed_dim)
    with num_threads(threads):
        for chunk in tqdm(order.split(batch_size), desc="encode texts", disable=not progress):
            with autocast_context(device, precision):  # "auto": bf16 where the hardware has it natively
                x = model.encode_text(tokens[chunk].to(device, non_blocking=True))  # (B, embed_dim)
            features[chunk] = F.normalize(x.float(), dim=-1).cpu()  # normalise in float32, not bf16
    return features.numpy()


# -----------------------------------------------------------------------------
# Recall@K. Both directions are one problem: queries search a database; database item j is a positive for
# query i when database_label[j] == query_label[i].
#   text -> image: queries = captions (label: their image), database = images (label: own index)
#   image -> text: queries = images (label: own index), database = captions (label: their image)


def _directions(image_features, text_features, caption_image):
    images = np.arange(len(image_features))
    return {"text_to_image": (text_features, caption_image, image_features, images),
            "image_to_text": (image_features, images, text_features, caption_image)}


def _sort_ties_by_id(scores, ids):
    order = np.lexsort((ids, -scores), axis=1)  # by score, highest first; equal scores: lower id first
    return np.take_along_axis(ids, order, axis=1)


def faiss_ranked(queries, database, k):
    """(n_queries, min(k, n)) ids of the best database items per query, by inner product, ties by lower id.

    On unit vectors the inner product IS the cosine similarity, and |x - y|^2 = 2 - 2 <x, y>, so IndexFlatIP ranks
    exactly like the tutorial's IndexFlatL2 (up to rounding), and its scores are the CLIP logits / logit_scale."""
    n = len(database)
    k = min(k, n)
    index = faiss.IndexFlatIP(database.shape[1])  # exact search: every query against every vector, no training
    index.add(database)
    scores, ids = index.search(queries, min(k + 1, n))  # one extra result shows whether a tie crosses the cut
    ranked = _sort_ties_by_id(scores, ids)[:, :k]
    if k < n:
        # If result k and k+1 tie, FAISS may have left out tied items with lower ids that belong in the top k.
        # Only exact duplicates do this, so it is rare: search those rows over the whole database.
        straddle = scores[:, k - 1] == scores[:, k]
        if straddle.any():
            ranked[straddle] = _sort_ties_by_id(*index.search(queries[straddle], n))[:, :k]
    return ranked


def recall_at_k(image_features, text_features, caption_image, ks=KS):
    """Recall@k both ways with FAISS exact search, as fractions in [0, 1].
    image_features (n_images, d) and text_features (n_captions, d): L2-normalised; caption_image (n_captions,): the
    index of each caption's image. Returns {"text_to_image": {"R@1": ..}, "image_to_text": {..}}."""
    if faiss is None:
        return brute_force_recall(image_features, text_features, caption_image, ks)
    image_features, text_features = (np.ascontiguousarray(x, dtype=np.float32) for x in (image_features, text_features))
    caption_image = np.asarray(caption_image, dtype=np.int64)
    results = {}
    for direction, (queries, query_label, database, database_label) in _directions(
            image_features, text_features, caption_image).items():
        ranked = faiss_ranked(queries, database, max(ks))  # (n_queries, K)
        hit = database_label[ranked] == query_label[:, None]  # (n_queries, K): is result j a positive?
        results[direction] = {f"R@{k}": int(hit[:, :k].any(axis=1).sum()) / len(hit) for k in ks}
    return results


def rank_of_best_positive(scores, positive):
    """(rows, n) scores and positive mask -> (rows,) 0-based rank of the best-ranked positive when each row is sorted
    by score, equal scores by lower index; inf for a row without positives."""
    best = scores.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)  # (rows, 1) best positive score
    cols = torch.arange(scores.shape[1])
    first = torch.where(positive & (scores == best), cols, scores.shape[1]).amin(dim=1, keepdim=True)  # its index
    ahead = (scores > best) | ((scores == best) & (cols < first))  # (rows, n) items ranked before it
    return ahead.sum(dim=1).float().masked_fill(~positive.any(dim=1), torch.inf)


def brute_force_recall(image_features, text_features, caption_image, ks=KS, chunk=1024):
    """recall_at_k from the full similarity matrix in torch, `chunk` query rows at a time: the tests' oracle,
    and the fallback without FAISS."""
    image_features, text_features = (torch.as_tensor(x, dtype=torch.float32) for x in (image_features, text_features))
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    results = {}
    for direction, (queries, query_label, database, database_label) in _directions(
            image_features, text_features, caption_image).items():
        query_label = torch.as_tensor(query_label)
        database_label = torch.as_tensor(database_label)
        ranks = torch.cat([rank_of_best_positive(queries[i:i + chunk] @ database.T,  # (chunk, n) cosine similarities
                                                 query_label[i:i + chunk, None] == database_label[None, :])
                           for i in range(0, len(queries), chunk)])
        results[direction] = {f"R@{k}": int((ranks < k).sum()) / len(ranks) for k in ks}
    return results

# -----------------------------------------------------------------------------
# The whole evaluation


def save_features(save_dir, image_features, text_features, dataset, results):
    """Features as .npy next to their ids, so they can be searched again (e.g. a FAISS demo) without the model."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    np.save(save_dir / "image_features.npy", image_features)  # row i: dataset.records[i].image
    np.save(save_dir / "text_features.npy", text_features)  # row j: dataset.captions[j]
    ids = {"images": [r.image for r in dataset.records], "captions": dataset.captions,
           "caption_image": dataset.caption_image.tolist()}
    (save_dir / "ids.json").write_text(json.dumps(ids, ensure_ascii=False))
    (save_dir / "results.json").write_text(json.dumps(results, indent=2))


def evaluate_retrieval(model, records, image_root, protocol="5cap", split_name="test", batch_size=256, workers=None,
                       device=None, save_dir=None, progress=True, precision="auto", threads=None):
    """Encode `records` (from data.read_captions) and compute Recall@1/5/10 both ways -> dict with split, protocol,
    images, captions, truncated_captions, text_to_image and image_to_text (fractions in [0, 1]).
    workers and threads: None chooses them for the cores free now (encode_plan); precision: runtime.PRECISIONS."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if not records:
        raise ValueError(f"no images to evaluate in {split_name}")
    check_images(records, image_root)  # before any encoding: paths inside the image root, no file missing
    transform = image_transform(model.config.vision.image_size)  # the eval transform: resize, centre crop
    dataset = CaptionEvalDataset(records, image_root, transform, captions_per_image=PROTOCOLS[protocol])
    context_length = model.config.text.context_length
    workers, threads = encode_plan(workers, threads, dataset, _device(model, device))  # measured once for both
    was_training = model.training
    model.eval()
    try:
        image_features = encode_images(model, dataset, batch_size, workers, device, progress, precision, threads)
        text_features = encode_texts(model, dataset.captions, batch_size, device, progress, precision, threads)
    finally:
        model.train(was_training)
    results = {"split": split_name, "protocol": protocol, "images": len(image_features), "captions": len(text_features),
               "truncated_captions": sum(count_tokens(c) > context_length - 2 for c in dataset.captions),
               **recall_at_k(image_features, text_features, dataset.caption_image.numpy())}
    if save_dir is not None:
        save_features(save_dir, image_features, text_features, dataset, results)
    return results


def format_results(results):
    """A header line and a small R@K table in percent."""
    ks = list(results["text_to_image"])
    lines = [f"{results['split']} ({results['protocol']} protocol): {results['images']} images, "
             f"{results['captions']} captions"]
    if results.get("truncated_captions"):
        lines[0] += f" ({results['truncated_captions']} truncated to the context length)"
    lines.append(f"{'':13s}" + "".join(f"{k:>8s}" for k in ks))
    for direction, name in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
        lines.append(f"{name:13s}" + "".join(f"{100 * results[direction][k]:8.2f}" for k in ks))
    return "\n".join(lines)

