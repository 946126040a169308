"""eval.tools.prepare end to end against a local HTTP server (127.0.0.1) serving generated archives."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from eval.tools.download import ChecksumError
from eval.tools.prepare import compose_config, main, prepare
from tests import fixtures as fx

pytestmark = pytest.mark.filterwarnings("ignore::eval.datasets.SplitSizeWarning")


class Server:
    """Serves ``files`` (path -> bytes) with Range support; ``cut[path] = n`` makes the next
    response for ``path`` stop after ``n`` bytes, as a dropped connection would."""

    def __init__(self):
        self.files, self.cut, self.requests = {}, {}, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if self.path in outer.cut:
                    body = body[: outer.cut.pop(self.path)]
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def source(self, path, data, **extra):
        self.files[path] = data
        return {"file": path.rsplit("/", 1)[-1], "url": self.url + path,
                "size": len(data), "md5": hashlib.md5(data).hexdigest(), "sha256": None, **extra}  # fmt: skip


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def ade_archive(tmp_path, n=3):
    src = tmp_path / "src"
    labels = {f"ADE_val_{i:08d}": fx.grid_label([i, 0, 150], 6, 8) for i in range(1, n + 1)}
    fx.make_ade(src, labels)
    (src / "ADEChallengeData2016/images/training").mkdir(parents=True)
    return fx.zip_folder(src), labels


def test_download_extract_and_idempotence(tmp_path, server):
    data, labels = ade_archive(tmp_path)
    root = tmp_path / "data" / "ade20k"
    cfg = {"name": "ade20k", "root": str(root), "split": "val", "resolution": 512,
           "on_error": "raise",
           "sources": [server.source("/ADEChallengeData2016.zip", data, extract_to=".")]}  # fmt: skip
    out = []
    report = prepare(cfg, progress=False, echo=out.append)
    assert report.done == ["ADEChallengeData2016.zip"] and report.n_images == 3
    assert (root / "downloads/ADEChallengeData2016.zip").read_bytes() == data
    from eval.datasets import get_dataset

    item = get_dataset("ade20k", root, keep_size=True)[0]
    np.testing.assert_array_equal(item["label"].numpy(), labels["ADE_val_00000001"].astype(int) - 1)
    n_requests, n_lines = len(server.requests), len(out)
    report = prepare(cfg, progress=False, echo=out.append)
    assert report.already == ["ADEChallengeData2016.zip"] and report.done == []
    assert len(server.requests) == n_requests  # second run: nothing fetched
    assert "ADEChallengeData2016.zip: already prepared" in out[n_lines:]


def test_resume_after_interrupted_transfer(tmp_path, server):
    data, _ = ade_archive(tmp_path)
    root = tmp_path / "ade"
    src = server.source("/ADEChallengeData2016.zip", data, extract_to=".")
    server.cut["/ADEChallengeData2016.zip"] = len(data) // 3
    cfg = {"name": "ade20k", "root": str(root), "sources": [src]}
    with pytest.raises(OSError, match=r"interrupted.*run again to resume"):
        prepare(cfg, progress=False, echo=lambda s: None)
    part = root / "downloads/ADEChallengeData2016.zip.part"
    assert part.stat().st_size == len(data) // 3
    assert not (root / "downloads/ADEChallengeData2016.zip").exists()
    report = prepare(cfg, progress=False, echo=lambda s: None)
    assert server.requests[-1][1] == f"bytes={len(data) // 3}-"  # resumed, not restarted
    assert report.n_images == 3 and not part.exists()
    assert (root / "downloads/ADEChallengeData2016.zip").read_bytes() == data


def test_checksum_failure_is_reported_and_not_kept(tmp_path, server):
    data, _ = ade_archive(tmp_path)
    root = tmp_path / "ade"
    src = server.source("/ADEChallengeData2016.zip", data, extract_to=".")
    src["md5"] = "0" * 32
    cfg = {"name": "ade20k", "root": str(root), "sources": [src]}
    with pytest.raises(ChecksumError, match=r"md5 is [0-9a-f]{32}, expected 0{32}.*deleted"):
        prepare(cfg, progress=False, echo=lambda s: None)
    assert not list((root / "downloads").iterdir())  # neither .part nor the file
    assert not (root / ".prepared").exists() and not (root / "ADEChallengeData2016").exists()
    src["md5"], src["size"] = None, len(data) + 1
    with pytest.raises(ChecksumError, match="size"):
        prepare(cfg, progress=False, echo=lambda s: None)


def test_coco_plain_file_include_filter_and_tar(tmp_path, server):
    src = tmp_path / "src"
    lab = fx.grid_label([0, 91, 255], 5, 5)
    fx.make_coco(src, {"000000000139": lab})
    fx.save_grey(src / "annotations/train2017/000000000009.png", lab)  # must not be extracted
    curated = (src / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").read_bytes()
    root = tmp_path / "coco"
    cfg = {"name": "coco_stuff27", "root": str(root), "split": "curated", "sources": [
        server.source("/val2017.zip", fx.zip_folder(src / "images"), extract_to="images"),
        server.source("/stuff.tar", fx.tar_folder(src / "annotations"), extract_to="annotations",
                      include=["val2017/"]),
        server.source("/Coco164kFull_Stuff_Coarse_7.txt", curated, md5=None,
                      sha256=hashlib.sha256(curated).hexdigest(),
                      dest="curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")]}  # fmt: skip
    report = prepare(cfg, progress=False, echo=lambda s: None)
    assert report.n_images == 1 and len(report.done) == 3
    assert (root / "annotations/val2017/000000000139.png").is_file()
    assert not (root / "annotations/train2017").exists()
    assert (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").read_bytes() == curated


def test_cityscapes_manual_steps_then_verify_and_extract(tmp_path):
    src = tmp_path / "src"
    fx.make_cityscapes(src, {("lindau", "lindau_000000_000019"): fx.grid_label([7, 26], 4, 8)})
    root = tmp_path / "cityscapes"
    gt = fx.zip_folder(src / "gtFine", prefix="gtFine/")
    left = fx.zip_folder(src / "leftImg8bit", prefix="leftImg8bit/")
    sources = [
        {"file": "gtFine_trainvaltest.zip", "url": "x", "manual": True, "size": len(gt),
         "extract_to": ".", "include": ["gtFine/val/"]},
        {"file": "leftImg8bit_trainvaltest.zip", "url": "x", "manual": True,
         "md5": hashlib.md5(left).hexdigest(), "extract_to": ".", "include": ["leftImg8bit/val/"]},
    ]  # fmt: skip
    cfg = {"name": "cityscapes", "root": str(root), "split": "val", "sources": sources,
           "manual_steps": "log in, download, put the zips in {root}"}  # fmt: skip
    out = []
    report = prepare(cfg, progress=False, echo=out.append)
    assert report.missing == ["gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"]
    assert not report.complete and f"put the zips in {root}" in out[-1]
    root.mkdir(exist_ok=True)
    (root / "gtFine_trainvaltest.zip").write_bytes(gt)
    (root / "leftImg8bit_trainvaltest.zip").write_bytes(left[:-1] + b"x")
    with pytest.raises(ChecksumError, match=r"leftImg8bit_trainvaltest\.zip: md5"):
        prepare(cfg, progress=False, echo=out.append)
    (root / "leftImg8bit_trainvaltest.zip").write_bytes(left)
    report = prepare(cfg, progress=False, echo=out.append)
    assert report.complete and report.n_images == 1
    assert report.already == ["gtFine_trainvaltest.zip"]  # verified once, not again


def test_cli_composes_the_hydra_config(tmp_path, capsys):
    cfg = compose_config(["dataset=voc", f"dataset.root={tmp_path}/v"])
    assert cfg.dataset.root == f"{tmp_path}/v" and cfg.dataset.sources[0].md5
    cfg = compose_config(["dataset=coco_object"])
    assert cfg.dataset.name == "coco_object" and cfg.dataset.split == "full"
    assert cfg.dataset.root.endswith("/data/coco_stuff") and len(cfg.dataset.sources) == 3
    assert main(["dataset=synthetic"]) == 0
    assert main(["dataset=cityscapes", f"dataset.root={tmp_path}/cs"]) == 1
    assert "cityscapes-dataset.com/login" in capsys.readouterr().out


def test_a_failed_download_says_where_to_put_the_file_by_hand(tmp_path, server):
    from eval.tools.download import download

    dest = tmp_path / "data" / "downloads" / "gone.zip"
    with pytest.raises(OSError, match="HTTP 404") as e:
        download(server.url + "/gone.zip", dest, progress=False)
    assert str(e.value).endswith(f"fetch it another way into {dest} and run the same command again")
