"""search.py: indexing an image folder (skipping broken files, incrementally), FAISS index types and their recall,
queries, the search page's server, and one-line errors on bad input. A tiny random-weight model: the features mean
nothing, but an image must still find itself."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import search
from checkpoints import save_checkpoint
from model import CLIP, CLIPConfig
from oracles import ROOT
from transform import load_image


def make_checkpoint(path, seed):
    torch.manual_seed(seed)
    save_checkpoint(path, CLIP(CLIPConfig.from_json(ROOT / "model_configs" / "MiniCLIP-XS-32px.json")), step=0)
    return path


def make_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)  # noise: distinct features
    Image.fromarray(pixels).save(path)


def make_folder(root):
    """5 PNGs at the top, one in a nested folder, one corrupt file and one text file (not an image extension)."""
    for i in range(5):
        make_png(root / f"img{i}.png", i)
    make_png(root / "nested" / "deep.png", 99)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    ckpt = make_checkpoint(d / "model.pt", 0)
    images = make_folder(d / "images")
    summary = search.index_folder(images, ckpt, d / "index", precision="fp32", batch_size=4)
    return d, images, ckpt, summary


@pytest.fixture(scope="module")
def searcher(built):
    return search.Searcher(built[0] / "index")


def test_index_skips_and_names_the_corrupt_file(built, capsys):
    d, images, ckpt, summary = built
    assert summary["counts"] == {"added": 6, "updated": 0, "removed": 0, "kept": 0, "skipped": 1}
    assert len(summary["skipped"]) == 1 and "broken.png" in summary["skipped"][0]
    search.print_summary(summary, d / "index")
    out = capsys.readouterr().out
    assert "6 images indexed" in out and "broken.png" in out and "index: flat" in out
    meta = json.loads((d / "index" / "meta.json").read_text())
    assert [f["path"] for f in meta["files"]] == [*(f"img{i}.png" for i in range(5)), "nested/deep.png"]
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    x = np.load(d / "index" / "embeddings.npy")
    assert x.shape == (6, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_query_by_image_finds_itself(built, searcher):
    images = built[1]
    for name in ("img3.png", "nested/deep.png"):
        first = searcher.search(load_image(images / name), k=3)[0]
        assert first["path"] == name and first["rank"] == 1
        assert first["score"] == pytest.approx(1, abs=1e-4)
    results = searcher.search("a red star left of a blue circle", k=4)
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    assert len(searcher.search("anything", k=50)) == 6  # k larger than the index: all of it


def test_incremental_reindex_encodes_only_what_changed(tmp_path, built):
    ckpt = built[2]
    images = make_folder(tmp_path / "images")
    out = tmp_path / "index"
    search.index_folder(images, ckpt, out, precision="fp32", kind="hnsw")
    before = dict(zip((f["path"] for f in json.loads((out / "meta.json").read_text())["files"]),
                      np.load(out / "embeddings.npy")))
    make_png(images / "new.png", 7)  # added
    (images / "img0.png").unlink()  # removed
    st = os.stat(images / "img1.png")
    os.utime(images / "img1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: updated
    summary = search.index_folder(images, ckpt, out, precision="fp32")
    assert summary["counts"] == {"added": 1, "updated": 1, "removed": 1, "kept": 4, "skipped": 1}
    assert summary["index"]["type"] == "hnsw"  # no --index: the kind the folder was built with
    after = dict(zip((f["path"] for f in json.loads((out / "meta.json").read_text())["files"]),
                     np.load(out / "embeddings.npy")))
    assert sorted(after) == sorted([*(f"img{i}.png" for i in range(1, 5)), "nested/deep.png", "new.png"])
    for path in ("img2.png", "img3.png", "img4.png", "nested/deep.png"):
        np.testing.assert_array_equal(after[path], before[path])
    np.testing.assert_allclose(after["img1.png"], before["img1.png"], atol=1e-5)  # same pixels, encoded again
    again = search.index_folder(images, ckpt, out, precision="fp32")
    assert again["counts"] == {"added": 0, "updated": 0, "removed": 0, "kept": 6, "skipped": 1}
    first = search.Searcher(out).search(load_image(images / "new.png"), k=1)[0]
    assert first["path"] == "new.png"


def test_another_checkpoint_is_refused_unless_rebuild(tmp_path, built):
    d, images = built[0], built[1]
    other = make_checkpoint(tmp_path / "other.pt", 1)
    out = tmp_path / "index"
    search.index_folder(images, built[2], out, precision="fp32")
    with pytest.raises(search.SearchError, match="another checkpoint.*--rebuild"):
        search.index_folder(images, other, out, precision="fp32")
    summary = search.index_folder(images, other, out, precision="fp32", rebuild=True)
    assert summary["counts"]["added"] == 6
    with pytest.raises(search.SearchError, match="not the model"):
        search.Searcher(d / "index", checkpoint=other)


def test_moved_checkpoint(tmp_path, built):
    """The index remembers its checkpoint; when it moves, --checkpoint with the same bytes is accepted."""
    moved = tmp_path / "moved.pt"
    moved.write_bytes(built[2].read_bytes())
    search.index_folder(built[1], moved, tmp_path / "index", precision="fp32")
    moved.rename(tmp_path / "elsewhere.pt")
    with pytest.raises(search.SearchError, match="checkpoint not found.*pass --checkpoint"):
        search.Searcher(tmp_path / "index")
    first = search.Searcher(tmp_path / "index", checkpoint=tmp_path / "elsewhere.pt").search(
        load_image(built[1] / "img0.png"), k=1)[0]
    assert first["path"] == "img0.png"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(kind):
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # (3000, 32) unit rows
    index, info = search.build_index(x, kind)
    assert info["type"] == kind and info["recall@10"] >= 0.9
    queries = np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)  # new queries, not in the index
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact, _ = search.build_index(x, "flat")
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    assert np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]) >= 0.9
    assert search.build_index(x, "auto")[1] == {"type": "flat"}  # 3,000 vectors: exact search


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_server(built, searcher):
    images = built[1]
    server = search.make_server(searcher, "127.0.0.1", 0, k=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, page = get(base + "/")
        assert status == 200 and b"<form" in page and b'type="file"' in page
        status, body = get(base + "/search?q=a+red+star&k=3")
        assert status == 200 and len(json.loads(body)["results"]) == 3
        assert get(base + "/search?q=a+red+star&k=0")[0] == 400
        assert get(base + "/image/0") == (200, (images / "img0.png").read_bytes())
        assert get(base + "/image?path=nested/deep.png") == (200, (images / "nested" / "deep.png").read_bytes())
        assert get(base + "/image/nested/deep.png")[0] == 200
        assert get(base + "/image?path=../model.pt")[0] == 403
        assert get(base + "/image/..%2F..%2Fmodel.pt")[0] == 403
        assert get(base + "/image?path=/etc/passwd")[0] == 403
        assert get(base + "/image?path=broken.png")[0] == 404  # in the folder, but not indexed
        assert get(base + "/image?path=notes.txt")[0] == 404
        assert get(base + "/image/99")[0] == 404
        request = urllib.request.Request(base + "/search?k=2", data=(images / "img2.png").read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            results = json.loads(r.read())["results"]
        assert len(results) == 2 and results[0]["path"] == "img2.png"
    finally:
        server.shutdown()
        server.server_close()


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        search.main(argv)
    message = str(e.value.code) if e.value.code not in (None, 0, 2) else capsys.readouterr().err
    assert message.startswith("error:") and "\n" not in message.strip(), message
    return message


def test_bad_inputs(tmp_path, built, capsys):
    d, images, ckpt, _ = built
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "index")
    assert "no such folder" in one_line_error(capsys, ["index", str(tmp_path / "nope"), "--checkpoint", str(ckpt),
                                                       "--out", out])
    assert "no image files" in one_line_error(capsys, ["index", str(tmp_path / "empty"), "--checkpoint", str(ckpt),
                                                       "--out", out])
    assert "checkpoint not found" in one_line_error(capsys, ["index", str(images), "--checkpoint",
                                                             str(tmp_path / "x.pt"), "--out", out])
    assert "not a search index" in one_line_error(capsys, ["query", str(tmp_path / "empty"), "a star"])
    assert "is a file" in one_line_error(capsys, ["index", str(images), "--checkpoint", str(ckpt), "--out", str(ckpt)])
    assert "give a text" in one_line_error(capsys, ["query", str(d / "index"), " "])
    assert "file not found" in one_line_error(capsys, ["query", str(d / "index"), "--image", str(tmp_path / "no.png")])
    with pytest.raises(SystemExit) as e:  # argparse: usage line, then the error naming -k
        search.main(["query", str(d / "index"), "a star", "-k", "0"])
    assert e.value.code == 2 and "-k" in capsys.readouterr().err


def test_default_without_a_trained_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(search, "DEFAULT_CHECKPOINT", tmp_path / "last.pt")
    with pytest.raises(SystemExit) as e:
        search.main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "python train.py" in err and len(err.strip().splitlines()) == 1


def test_cli_query(built):
    """The real command line: rank, score and path per result, or JSON; an error is one line on stderr."""
    d, images = built[0], built[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, ROOT / "search.py", "query", d / "index", "--image", images / "img4.png",
                          "-k", "2", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert [r["rank"] for r in results] == [1, 2] and results[0]["path"] == str(images / "img4.png")
    run = subprocess.run([sys.executable, ROOT / "search.py", "query", d, "a star"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith("error:") and len(run.stderr.strip().splitlines()) == 1


def test_serve_prints_the_url_and_stops_on_ctrl_c(built):
    """python search.py serve: one line with the URL, and Ctrl-C (SIGINT) ends it cleanly, exit status 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, ROOT / "search.py", "serve", built[0] / "index", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        line = server.stdout.readline()
        assert line.startswith("serving 6 images at http://127.0.0.1:"), line
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0 and "Traceback" not in rest and "stopped" in rest


BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no browser for the page test: install Debian's package with "
                                            "`apt-get install -y chromium` (.ci/run does)")
def test_the_page_in_a_real_browser(built, searcher, tmp_path, monkeypatch):
    """Headless chromium opens /?q=...&k=4, which fills the query box and submits the form as a click would; the page's
    script fetches /search and draws the gallery. The dumped DOM must show the top 4 in the server's order, and the
    browser must have loaded each of those images."""
    served = []
    get_image = search.Handler.do_GET
    monkeypatch.setattr(search.Handler, "do_GET", lambda self: served.append(self.path) or get_image(self))
    server = search.make_server(searcher, "127.0.0.1", 0, k=20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        want = [f"/image/{r['id']}" for r in json.loads(get(base + "/search?q=a+red+star&k=4")[1])["results"]]
        dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path}", "--virtual-time-budget=15000", "--dump-dom",
                              base + "/?q=a%20red%20star&k=4"], capture_output=True, text=True, timeout=120).stdout
    finally:
        server.shutdown()
        server.server_close()
    assert re.findall(r'<img src="(/image/\d+)"', dom) == want
    assert "/?q=a%20red%20star&k=4" in served and set(want) <= set(served)  # the page, then each of its images


def test_two_processes_build_the_same_index_as_one(built, tmp_path):
    """torchrun --nproc_per_node 2 search.py index ...: each process encodes half of the files, rank 0 merges."""
    _, images, ckpt, _ = built
    one, two = tmp_path / "one", tmp_path / "two"
    search.index_folder(images, ckpt, one, precision="fp32", batch_size=2)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                             str(ROOT / "search.py"), "index", str(images), "--checkpoint", str(ckpt), "--out",
                             str(two), "--precision", "fp32", "--batch-size", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 images indexed" in result.stdout and "broken.png" in result.stdout  # one summary, from rank 0
    np.testing.assert_allclose(np.load(two / "embeddings.npy"), np.load(one / "embeddings.npy"), rtol=0, atol=1e-6)
    a, b = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert a["files"] == b["files"] and a["index"] == b["index"]
