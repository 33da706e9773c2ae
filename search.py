r"""
Text-to-image search over your own image folder: the search page of the MiniClip tutorial (a textbox, a button and
a gallery of the top k images), offline, over a FAISS index of saved image features.

    python search.py                                   # the built-in Shapes test images with out/shapes/last.pt
    python search.py index IMAGES_DIR --checkpoint CKPT --out INDEX_DIR \
        [--precision auto|fp32|bf16|fp16] [--batch-size N] [--index auto|flat|ivf|hnsw] [--rebuild]
    python search.py query INDEX_DIR "a red star left of a blue circle" [-k 10] [--json]
    python search.py query INDEX_DIR --image PATH [-k 10] [--json] [--checkpoint CKPT]
    python search.py serve INDEX_DIR [--port 7860] [--host 127.0.0.1] [-k 20]

How it works (CLIP paper section 3, https://arxiv.org/abs/2103.00020): every image is encoded once and its feature
L2-normalised, so the inner product of two features IS their cosine similarity. A query (a text, or another image)
is encoded the same way and the index returns the k features with the largest inner product.

An index folder holds three files: embeddings.npy ((N, embed_dim) float32, unit rows), meta.json (for row i: the
image's path relative to the image folder, its size and mtime; the checkpoint and its SHA-256; the index type and
its search parameters) and index.faiss. Indexing again is incremental: only new or changed files (size or mtime)
are encoded, deleted ones are dropped, and the FAISS index is rebuilt from the saved features (seconds).

Index types, after the FAISS wiki "Guidelines to choose an index"
(https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):
  flat  IndexFlatIP: exact; every query is compared with every vector (100k x 512-d: ~18 ms a query on one core).
  ivf   IndexIVFFlat: k-means cuts the vectors into nlist ~ 4*sqrt(N) cells; a query visits the nprobe nearest cells.
  hnsw  IndexHNSWFlat: a graph of neighbours (M = 32 links per vector), walked greedily with efSearch candidates.
  auto  flat up to AUTO_FLAT_MAX vectors, hnsw beyond (no training step, and the wiki's choice when memory is fine).
An approximate index is checked when it is built: recall@10 against exact search, with up to 1,000 of the indexed
vectors as queries (their own vector left out). nprobe / efSearch are doubled until that recall reaches
TARGET_RECALL, and stored in meta.json.
"""
import argparse
import html
import json
import math
import mimetypes
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from checkpoints import CheckpointError, load_checkpoint
from run_state import file_digest
from runtime import (autocast_context, error_line, int_at_least, pick_device, plain_warnings, precision_line,
                     resolve_precision, PRECISIONS, setup_distributed)
from tokenizer import tokenize
from transform import IMAGE_EXTENSIONS, ImageLoadError, image_transform, load_image

try:
    import faiss
except ImportError:  # the error says what to install when an index is needed
    faiss = None

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "out" / "shapes" / "last.pt"
DEFAULT_INDEX = ROOT / "out" / "search" / "shapes"
AUTO_FLAT_MAX = 100_000  # auto: exact search up to this many vectors (100k x 512-d: ~18 ms a query on one core)
TARGET_RECALL = 0.95  # an approximate index searches more widely until its recall@10 reaches this
RECALL_QUERIES = 1000  # indexed vectors used as queries to measure recall@10
HNSW_M = 32  # links per vector in the HNSW graph (the wiki's "HNSW32")
MAX_UPLOAD = 20 * 1024 * 1024  # bytes: the largest image the page may POST
FILES = ("embeddings.npy", "meta.json", "index.faiss")


class SearchError(ValueError):
    """Bad input to search.py; the message names the file or flag and what to do."""


# -----------------------------------------------------------------------------
# The image folder and the checkpoint, as metadata a later run can compare with


def list_images(images_dir):
    """Relative paths (posix, sorted) of the image files under images_dir, recursively."""
    root = Path(images_dir)
    if not root.is_dir():
        raise SearchError(f"{images_dir}: no such folder: give the folder of images to index")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def file_stat(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def checkpoint_record(path):
    """What identifies a checkpoint: its path, its size and mtime, and the SHA-256 of its bytes."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"checkpoint not found: {path}: pass --checkpoint with a trained model "
                          "(python train.py writes out/shapes/last.pt)")
    return {"path": str(path.resolve()), **file_stat(path), "sha256": file_digest(path)}


# -----------------------------------------------------------------------------
# Encoding: images and texts -> L2-normalised float32 features, at the project's precision policy (runtime.py)


class Encoder:
    """A loaded CLIP with its image preprocessing, device and precision."""

    def __init__(self, checkpoint, precision="auto", verbose=False, local_rank=0):
        self.device = pick_device(None, local_rank)
        self.precision = precision_line(self.device, precision) if verbose else \
            resolve_precision(self.device, precision)[0]
        self.model = load_checkpoint(checkpoint, verbose=verbose).to(self.device)
        self.transform = image_transform(self.model.config.vision.image_size)
        self.lock = threading.Lock()  # the server's threads share one model

    @torch.inference_mode()
    def _features(self, encode, x):
        with self.lock, autocast_context(self.device, self.precision):
            return F.normalize(encode(x.to(self.device)).float(), dim=-1).cpu().numpy()  # (B, embed_dim) unit rows

    def images(self, pil_images):
        return self._features(self.model.encode_image, torch.stack([self.transform(im) for im in pil_images]))

    def texts(self, texts):
        return self._features(self.model.encode_text, tokenize(texts, self.model.config.text.context_length))


def encode_files(encoder, root, paths, batch_size):
    """Encodes root/path for each path, `batch_size` at a time -> (features (n_ok, D), ok paths, skipped errors).
    An unreadable file is skipped and its error kept; the rest of its batch is encoded."""
    features, ok, skipped = [], [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="encoding", unit="batch", disable=not paths):
        images, names = [], []
        for path in paths[i:i + batch_size]:
            try:
                images.append(load_image(Path(root) / path))
                names.append(path)
            except ImageLoadError as e:
                skipped.append(error_line(e))
        if images:
            features.append(encoder.images(images))  # (B, D)
            ok += names
    dim = encoder.model.config.embed_dim
    return (np.concatenate(features) if features else np.zeros((0, dim), np.float32)), ok, skipped


# -----------------------------------------------------------------------------
# FAISS indexes (all by inner product: on unit vectors that is the cosine similarity)


def recall_at_10(index, x, queries):
    """Mean share of the exact 10 nearest neighbours (IndexFlatIP over x) of x[queries] that `index` also returns.
    The query's own vector is left out of both lists: every index finds it first, and it would flatter the recall
    (on random vectors, 0.95 with it was 0.87 for new queries)."""
    k = min(10, len(x) - 1)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(x[queries], k + 1)  # (Q, k + 1) ids
    _, found = index.search(x[queries], k + 1)  # (Q, k + 1) ids
    hits = [len(set([i for i in t if i != q][:k]) & set([i for i in f if i != q][:k])) / k
            for q, t, f in zip(queries, truth, found)]
    return float(np.mean(hits)) if k > 0 else 1.0


def tune(index, x, set_param, start, stop):
    """Doubles a search parameter (nprobe, efSearch) from start until recall@10 reaches TARGET_RECALL or stop.
    Returns (value, recall)."""
    queries = np.random.default_rng(0).choice(len(x), min(RECALL_QUERIES, len(x)), replace=False)
    value = start
    while True:
        set_param(index, value)
        recall = recall_at_10(index, x, queries)
        if recall >= TARGET_RECALL or value >= stop:
            return value, recall
        value = min(2 * value, stop)


def set_nprobe(index, n):
    index.nprobe = n


def set_ef_search(index, n):
    index.hnsw.efSearch = n


def build_index(x, kind="auto"):
    """A FAISS index over the unit rows of x (N, D) float32 -> (index, info). info: the type, its search parameter
    and the measured recall@10 for an approximate one; apply_params(index, info) sets the parameter again."""
    if faiss is None:
        raise SearchError("FAISS is not installed: pip install faiss-cpu")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n <= AUTO_FLAT_MAX else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)  # exact: every query against every vector, no training
        index.add(x)
        return index, {"type": "flat"}
    if kind == "ivf":
        # 4*sqrt(N) cells (the wiki's lower end), but at least 39 training vectors per cell, as k-means wants
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)  # k-means: the nlist cell centres
        index.add(x)
        nprobe, recall = tune(index, x, set_nprobe, start=max(1, nlist // 64), stop=nlist)
        return index, {"type": "ivf", "nlist": nlist, "nprobe": nprobe, "recall@10": recall}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80  # candidates while linking: a better graph for a slower build (default 40)
        index.add(x)  # no training: the graph grows one vector at a time
        # Indexed vectors are easier queries for a graph than new ones (they are linked into it): on 3,000 random
        # 32-d vectors efSearch 16 found 0.99 of their neighbours but 0.87 of a new query's; 64 found 0.997. So 64 up.
        ef, recall = tune(index, x, set_ef_search, start=64, stop=max(64, min(n, 4096)))
        return index, {"type": "hnsw", "M": HNSW_M, "efSearch": ef, "recall@10": recall}
    raise SearchError(f"--index {kind}: choose auto, flat, ivf or hnsw")


def apply_params(index, info):
    """Sets the stored search parameter of an index read back from disk."""
    if info["type"] == "ivf":
        set_nprobe(index, info["nprobe"])
    elif info["type"] == "hnsw":
        set_ef_search(index, info["efSearch"])


# -----------------------------------------------------------------------------
# Building and updating an index folder


def read_meta(index_dir):
    """meta.json of an index folder, or a SearchError saying what the folder lacks."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise SearchError(f"{index_dir}: no such folder: build an index first (python search.py index IMAGES_DIR "
                          f"--checkpoint CKPT --out {index_dir})")
    missing = [name for name in FILES if not (index_dir / name).is_file()]
    if missing:
        raise SearchError(f"{index_dir} is not a search index (no {', '.join(missing)}): build one with "
                          f"python search.py index IMAGES_DIR --checkpoint CKPT --out {index_dir}")
    try:
        return json.loads((index_dir / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise SearchError(f"{index_dir / 'meta.json'} is damaged ({e}): build the index again with --rebuild") from None


def previous_index(out, images_dir, checkpoint, rebuild):
    """(meta, embeddings) of the index already in `out` that can be updated, or (None, None) for a fresh build.
    Another checkpoint or another image folder is refused: mixing features of two models makes scores meaningless."""
    if rebuild or not (Path(out) / "meta.json").exists():
        return None, None
    meta = read_meta(out)
    old = meta["checkpoint"]
    if old["sha256"] != checkpoint["sha256"]:
        raise SearchError(f"{out} was built with another checkpoint ({old['path']}, sha256 {old['sha256'][:12]}...), "
                          f"not {checkpoint['path']} (sha256 {checkpoint['sha256'][:12]}...): add --rebuild to "
                          "encode every image again with it, or choose another --out")
    if meta["images_dir"] != str(Path(images_dir).resolve()):
        raise SearchError(f"{out} indexes another folder ({meta['images_dir']}): add --rebuild, "
                          "or choose another --out")
    return meta, np.load(Path(out) / "embeddings.npy")


def plan_update(paths, stats, meta):
    """Compares the folder now with the index -> ({path: row} of features to keep, paths to encode)."""
    old = {f["path"]: (i, f) for i, f in enumerate(meta["files"])} if meta else {}
    keep, encode = {}, []
    for path in paths:
        row, saved = old.get(path, (None, None))
        if saved and (saved["size"], saved["mtime_ns"]) == (stats[path]["size"], stats[path]["mtime_ns"]):
            keep[path] = row
        else:
            encode.append(path)  # new, or changed since it was encoded
    return keep, encode


def index_folder(images_dir, checkpoint, out, precision="auto", batch_size=64, kind=None, rebuild=False,
                 paths=None, rank=0, world=1, local_rank=0):
    """Builds or updates the index of images_dir in `out`; `paths` (relative) limits it to those files.
    kind: auto, flat, ivf or hnsw; None: what the index folder's last run asked for, else auto.
    Under torchrun (world > 1) each process encodes every world-th file to encode, and rank 0 gathers them, builds
    the index and writes it; the other processes return None.
    Returns a summary: counts (added, updated, removed, kept, skipped), the skipped files' errors, the index info."""
    paths = list_images(images_dir) if paths is None else sorted(paths)
    if not paths:
        raise SearchError(f"{images_dir}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    if Path(out).exists() and not Path(out).is_dir():
        raise SearchError(f"--out {out} is a file: give a folder for the index")
    record = checkpoint_record(checkpoint)
    meta, old_x = previous_index(out, images_dir, record, rebuild)
    stats = {p: file_stat(Path(images_dir) / p) for p in paths}
    keep, to_encode = plan_update(paths, stats, meta)
    encoder = Encoder(checkpoint, precision, verbose=rank == 0, local_rank=local_rank)
    if keep and to_encode and meta["precision"] != encoder.precision:
        print(f"note: the {len(keep)} unchanged images were encoded at {meta['precision']}, the others will be at "
              f"{encoder.precision}: add --rebuild to encode all of them at {encoder.precision}")
    new_x, encoded, skipped = encode_files(encoder, images_dir, to_encode[rank::world], batch_size)
    if world > 1:  # every process's share, in rank order; only rank 0 goes on to write the index
        shares = [None] * world
        dist.all_gather_object(shares, (new_x, encoded, skipped))
        if rank != 0:
            return None
        new_x = np.concatenate([x for x, _, _ in shares])  # (n_encoded, D)
        encoded, skipped = [p for _, ps, _ in shares for p in ps], [e for _, _, es in shares for e in es]
    if not keep and not encoded:
        raise SearchError(f"{images_dir}: none of the {len(paths)} image files could be read (first: {skipped[0]})")
    old_paths = {f["path"] for f in meta["files"]} if meta else set()
    final = sorted([*keep, *encoded])
    counts = {"added": sum(p not in old_paths for p in encoded), "updated": sum(p in old_paths for p in encoded),
              "removed": len(old_paths - set(final)), "kept": len(keep), "skipped": len(skipped)}
    # features in the order of `final`: kept rows from the old embeddings, the rest from this run's
    fresh = dict(zip(encoded, new_x))
    x = np.stack([old_x[keep[p]] if p in keep else fresh[p] for p in final]).astype(np.float32)  # (N, D) unit rows
    kind = kind or (meta and meta["index"].get("requested")) or "auto"
    index, info = build_index(x, kind)
    info["requested"] = kind  # so that the next run without --index builds the same kind (auto may change type)
    meta = {"images_dir": str(Path(images_dir).resolve()), "checkpoint": record, "precision": encoder.precision,
            "index": info, "files": [{"path": p, **stats[p]} for p in final]}
    write_index(out, x, meta, index)
    return {"counts": counts, "skipped": skipped, "index": info, "n": len(final)}


def write_index(out, x, meta, index):
    """The three files; meta.json last, so a run killed half-way leaves no index that looks complete."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    np.save(out / "embeddings.npy", x)
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def print_summary(summary, out):
    c, info = summary["counts"], summary["index"]
    print(f"{summary['n']} images indexed in {out}: {c['added']} added, {c['updated']} updated, "
          f"{c['removed']} removed, {c['kept']} kept")
    if summary["skipped"]:
        print(f"skipped {c['skipped']} unreadable files:")
        for line in summary["skipped"][:5]:
            print(f"  {line}")
        if c["skipped"] > 5:
            print(f"  ... and {c['skipped'] - 5} more")
    params = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                       if k not in ("type", "requested"))
    print(f"index: {info['type']}" + (f" ({params})" if params else ""))


# -----------------------------------------------------------------------------
# Searching an index folder


class Searcher:
    """An index folder loaded for queries: its metadata, its FAISS index and the model that encoded it."""

    def __init__(self, index_dir, checkpoint=None):
        self.meta = read_meta(index_dir)
        self.root = Path(self.meta["images_dir"])
        self.paths = [f["path"] for f in self.meta["files"]]  # row i of the index is image self.paths[i]
        self.indexed = set(self.paths)
        if faiss is None:
            raise SearchError("FAISS is not installed: pip install faiss-cpu")
        self.index = faiss.read_index(str(Path(index_dir) / "index.faiss"))
        apply_params(self.index, self.meta["index"])
        self.encoder = Encoder(self.model_file(index_dir, checkpoint))

    def model_file(self, index_dir, checkpoint):
        """The checkpoint the index was built with: the stored path, or --checkpoint if it moved (same bytes)."""
        saved = self.meta["checkpoint"]
        if checkpoint is None:
            if not Path(saved["path"]).is_file():
                raise SearchError(f"checkpoint not found: {saved['path']} (from {Path(index_dir) / 'meta.json'}): "
                                  "pass --checkpoint with where it is now")
            return saved["path"]
        if checkpoint_record(checkpoint)["sha256"] != saved["sha256"]:
            raise SearchError(f"--checkpoint {checkpoint} is not the model {index_dir} was built with "
                              f"({saved['path']}): index the folder again with it (search.py index ... --rebuild)")
        return checkpoint

    def search(self, query, k):
        """query: a text, or a PIL image -> [{rank, score, id, path}] of the k best images, best first."""
        x = self.encoder.images([query]) if isinstance(query, Image.Image) else self.encoder.texts([query])  # (1, D)
        scores, ids = self.index.search(x, min(k, len(self.paths)))  # (1, k) cosine similarities and row ids
        return [{"rank": rank, "score": float(s), "id": int(i), "path": self.paths[i]}
                for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1) if i >= 0]  # -1: fewer hits than k

    def file(self, key):
        """The indexed image named by row id ("12") or by relative path -> its Path; None if it is not indexed."""
        if key.isdecimal():
            i = int(key)
            return self.root / self.paths[i] if i < len(self.paths) else None
        return self.root / key if key in self.indexed else None


# -----------------------------------------------------------------------------
# The search page: one HTML page, a JSON endpoint and the indexed images, with the standard library's HTTP server

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MiniCLIP search</title>
<style>
 body { font-family: sans-serif; margin: 2em; }
 #gallery { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1em; }
 figure { margin: 0; width: 160px; font-size: 12px; word-break: break-all; }
 figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; image-rendering: pixelated; }
</style></head>
<body>
<h1>MiniCLIP search</h1>
<p>__COUNT__ images in <code>__FOLDER__</code></p>
<form id="text"><input id="q" size="50" placeholder="a red star left of a blue circle" autofocus>
 k <input id="k" type="number" min="1" value="__K__" style="width: 4em"> <button>Search</button></form>
<p>or search by image: <input id="file" type="file" accept="image/*"></p>
<div id="status"></div><div id="gallery"></div>
<script>
const $ = (id) => document.getElementById(id);
async function show(response) {
  const data = await response.json();
  $("status").textContent = data.error || "";
  $("gallery").innerHTML = "";
  for (const r of data.results || []) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "/image/" + r.id;
    const cap = document.createElement("figcaption");
    cap.textContent = r.rank + ". " + r.score.toFixed(3) + " " + r.path;
    fig.append(img, cap);
    $("gallery").append(fig);
  }
}
$("text").onsubmit = (e) => {
  e.preventDefault();
  fetch("/search?q=" + encodeURIComponent($("q").value) + "&k=" + $("k").value).then(show);
};
$("file").onchange = () => {
  if ($("file").files.length) fetch("/search?k=" + $("k").value, {method: "POST", body: $("file").files[0]}).then(show);
};
const asked = new URLSearchParams(location.search);  // /?q=...&k=...: a search that can be shared as a link
if (asked.get("q")) {
  $("q").value = asked.get("q");
  if (asked.get("k")) $("k").value = asked.get("k");
  $("text").requestSubmit();
}
</script></body></html>
"""


class Handler(BaseHTTPRequestHandler):
    """GET /, GET /search?q=TEXT&k=K, POST /search?k=K (the body: an image file), GET /image/ID or
    /image?path=RELATIVE_PATH (only indexed images). self.server.searcher and .k are set by make_server."""

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            page = PAGE.replace("__COUNT__", str(len(self.server.searcher.paths))).replace(
                "__FOLDER__", html.escape(str(self.server.searcher.root))).replace("__K__", str(self.server.k))
            self.reply(200, page.encode(), "text/html; charset=utf-8")
        elif url.path == "/search":
            text = query.get("q", [""])[0].strip()
            if not text:
                return self.reply_json(400, {"error": "give a text: /search?q=a+red+star&k=10"})
            self.answer(text, query)
        elif url.path == "/image" or url.path.startswith("/image/"):
            key = unquote(url.path[len("/image/"):]) if url.path.startswith("/image/") else query.get("path", [""])[0]
            self.send_image(key)
        else:
            self.reply_json(404, {"error": f"no page {url.path}"})

    def do_POST(self):
        url = urlparse(self.path)
        length = self.headers.get("Content-Length", "").strip()
        size = int(length) if length.isdecimal() else 0  # bytes of the uploaded image
        if url.path != "/search":
            return self.reply_json(404, {"error": f"no page {url.path}"})
        if not 0 < size <= MAX_UPLOAD:
            return self.reply_json(413 if size else 400, {"error": f"POST an image file of at most {MAX_UPLOAD} bytes"})
        try:
            image = load_image(BytesIO(self.rfile.read(size)))
        except ImageLoadError:
            return self.reply_json(400, {"error": "the upload is not an image this server can read"})
        self.answer(image, parse_qs(url.query))

    def answer(self, query, params):
        try:
            k = int(params.get("k", [self.server.k])[0])
        except ValueError:
            k = 0
        if k < 1:
            return self.reply_json(400, {"error": "k must be a whole number, at least 1"})
        self.reply_json(200, {"results": self.server.searcher.search(query, k)})

    def send_image(self, key):
        """Only files listed in the index, and only inside the image folder (a symlink out of it is refused)."""
        root = self.server.searcher.root.resolve()
        if ".." in Path(key).parts or key.startswith("/"):
            return self.reply_json(403, {"error": "only indexed images are served"})
        path = self.server.searcher.file(key)
        if path is None or not path.is_file():
            return self.reply_json(404, {"error": f"not an indexed image: {key}"})
        if not path.resolve().is_relative_to(root):
            return self.reply_json(403, {"error": "only images inside the indexed folder are served"})
        self.reply(200, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    def reply_json(self, status, obj):
        self.reply(status, json.dumps(obj).encode(), "application/json")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # quiet: no line per request
        pass


def make_server(searcher, host="127.0.0.1", port=7860, k=20):
    """A ThreadingHTTPServer for the search page (port 0: any free port; server.server_address says which)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.searcher, server.k = searcher, k
    return server


def serve(searcher, host, port, k):
    try:
        server = make_server(searcher, host, port, k)
    except OSError as e:
        raise SearchError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}): choose another --port")
    try:
        print(f"serving {len(searcher.paths)} images at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)",
              flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()


# -----------------------------------------------------------------------------
# Command line


def cmd_index(args):
    rank, world, local_rank = setup_distributed()  # torchrun --nproc_per_node N search.py index ...: N shards
    summary = index_folder(args.images, args.checkpoint, args.out, args.precision, args.batch_size, args.index,
                           args.rebuild, rank=rank, world=world, local_rank=local_rank)
    if world > 1:
        dist.destroy_process_group()
    if summary is not None:
        print_summary(summary, args.out)


def cmd_query(args):
    if args.text is not None and args.image is not None:
        raise SearchError("give a text to search for or --image PATH, not both")
    if args.image is None and not (args.text or "").strip():
        raise SearchError("give a text to search for (e.g. \"a red star\"), or --image PATH")
    searcher = Searcher(args.index_dir, args.checkpoint)
    query = load_image(args.image) if args.image else args.text
    results = searcher.search(query, args.k)
    for r in results:
        r["path"] = str(searcher.root / r.pop("path"))
        del r["id"]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['rank']:3d}  {r['score']:+.4f}  {r['path']}")  # score: cosine similarity


def cmd_serve(args):
    serve(Searcher(args.index_dir, args.checkpoint), args.host, args.port, args.k)


def cmd_default(args):
    """The built-in Shapes test images, indexed with the default run's model, then served."""
    from data import read_captions
    from synthetic import ensure_shapes
    if not DEFAULT_CHECKPOINT.exists():
        print(f"error: {DEFAULT_CHECKPOINT} not found: run `python train.py` first", file=sys.stderr)
        sys.exit(2)
    data = ensure_shapes()
    test = [r.image for r in read_captions(data, "test")]
    summary = index_folder(data.parent / "images", DEFAULT_CHECKPOINT, DEFAULT_INDEX, paths=test)
    print_summary(summary, DEFAULT_INDEX)
    serve(Searcher(DEFAULT_INDEX), "127.0.0.1", 7860, 20)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    i = sub.add_parser("index", help="encode an image folder into an index folder (again: only what changed)")
    i.add_argument("images", help="folder of images (searched recursively)")
    i.add_argument("--checkpoint", required=True, help="the model (any checkpoint load_checkpoint reads)")
    i.add_argument("--out", required=True, help="index folder to write")
    i.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype (auto: bf16 where the GPU or CPU multiplies bf16 natively, else fp32)")
    i.add_argument("--batch-size", type=int_at_least(1), default=64)
    i.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"],
                   help=f"FAISS index (auto: flat up to {AUTO_FLAT_MAX:,} images, hnsw beyond; default: the kind "
                        "the index folder was built with, else auto)")
    i.add_argument("--rebuild", action="store_true", help="encode every image again (e.g. with another checkpoint)")
    q = sub.add_parser("query", help="the top k images for a text or an image")
    q.add_argument("index_dir")
    q.add_argument("text", nargs="?", help="what to look for, e.g. \"a red star left of a blue circle\"")
    q.add_argument("--image", help="search by this image instead of a text")
    q.add_argument("--json", action="store_true", help="print a JSON list of {rank, score, path}")
    s = sub.add_parser("serve", help="the search page in the browser")
    s.add_argument("index_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    q.add_argument("-k", type=int_at_least(1), default=10, help="results (default: 10)")
    s.add_argument("-k", type=int_at_least(1), default=20, help="results per search on the page (default: 20)")
    for parser in (q, s):
        parser.add_argument("--checkpoint", help="the index's model, if it moved (default: the path in meta.json)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    plain_warnings()
    command = {"index": cmd_index, "query": cmd_query, "serve": cmd_serve, None: cmd_default}
    try:
        command[args.command](args)
    except (CheckpointError, ImageLoadError, FileNotFoundError, ValueError) as e:  # SearchError is a ValueError
        sys.exit(f"error: {error_line(e)}")


if __name__ == "__main__":
    main()
