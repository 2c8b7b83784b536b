"""download_url / extract_archive against a real HTTP server on 127.0.0.1 (no internet).

The served archive is a tiny Tiny-ImageNet-layout zip: success, bad checksum,
truncated transfer, truncated archive, HTTP error -- and in every failure case
nothing half-written is left on disk.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from adashift_pl.data.download import check_file, download_url, extract_archive
from adashift_pl.errors import UserError


def _tiny_layout_zip() -> bytes:
    """The Tiny-ImageNet zip layout in miniature (text stand-ins for the JPEGs)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01\nn02\n")
        zf.writestr("tiny-imagenet-200/train/n01/images/n01_0.JPEG", b"x" * 5000)
        zf.writestr("tiny-imagenet-200/val/images/val_0.JPEG", b"y" * 5000)
        zf.writestr("tiny-imagenet-200/val/val_annotations.txt", "val_0.JPEG\tn01\t0\t0\t63\t63\n")
    return buf.getvalue()


ZIP = _tiny_layout_zip()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path == "/tiny.zip":
            body = ZIP
        elif self.path == "/truncated.zip":  # a complete transfer of a broken file
            body = ZIP[: len(ZIP) // 2]
        elif self.path == "/short-read.zip":  # server promises more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(ZIP)))
            self.end_headers()
            self.wfile.write(ZIP[:100])
            self.wfile.flush()
            self.close_connection = True
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_download_and_extract_success(server, tmp_path):
    sha = hashlib.sha256(ZIP).hexdigest()
    md5 = hashlib.md5(ZIP).hexdigest()
    archive = download_url(f"{server}/tiny.zip", tmp_path / "tiny.zip", sha, md5=md5, progress=False)
    assert archive.read_bytes() == ZIP
    assert _leftovers(tmp_path) == ["tiny.zip"]  # no .part left
    # A second call finds the verified file and does not download again.
    assert download_url("http://127.0.0.1:9/unused", archive, sha, progress=False) == archive
    out = extract_archive(archive, tmp_path / "raw")
    root = out / "tiny-imagenet-200"
    assert (root / "wnids.txt").read_text().split() == ["n01", "n02"]
    assert (root / "val" / "val_annotations.txt").exists()
    assert (root / "train" / "n01" / "images" / "n01_0.JPEG").stat().st_size == 5000
    assert _leftovers(tmp_path) == ["raw", "tiny.zip"]  # no temporary extraction dir left


def test_bad_checksum_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match=r"checksum mismatch for .*tiny\.zip.*expected sha256 0+, got [0-9a-f]{64}"):
        download_url(f"{server}/tiny.zip", tmp_path / "tiny.zip", "0" * 64, progress=False)
    with pytest.raises(UserError, match="expected md5"):
        download_url(f"{server}/tiny.zip", tmp_path / "tiny.zip", md5="0" * 32, progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_file_with_wrong_checksum_is_reported_not_deleted(tmp_path):
    f = tmp_path / "tiny.zip"
    f.write_bytes(b"not the archive")
    with pytest.raises(UserError, match=r"tiny\.zip"):
        download_url("http://127.0.0.1:9/unused", f, "0" * 64, progress=False)
    assert f.read_bytes() == b"not the archive"
    with pytest.raises(UserError, match="checksum mismatch"):
        check_file(f, md5="0" * 32)


def test_short_read_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match=r"short-read\.zip"):
        download_url(f"{server}/short-read.zip", tmp_path / "a.zip", None, progress=False)
    assert _leftovers(tmp_path) == []


def test_http_error_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match=r"download of .*/missing\.zip failed"):
        download_url(f"{server}/missing.zip", tmp_path / "a.zip", None, progress=False)
    assert _leftovers(tmp_path) == []


def test_truncated_archive_is_named_and_nothing_extracted(server, tmp_path):
    archive = download_url(f"{server}/truncated.zip", tmp_path / "bad.zip", None, progress=False)
    with pytest.raises(UserError, match=r"bad\.zip is corrupt or truncated"):
        extract_archive(archive, tmp_path / "raw")
    assert _leftovers(tmp_path) == ["bad.zip"]


def test_corrupt_member_crc_is_caught(tmp_path):
    # Flip bytes inside the first stored member's data: the CRC check must fire.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/data.bin", b"z" * 1000)
    raw = bytearray(buf.getvalue())
    raw[100:110] = b"CORRUPTED!"
    archive = tmp_path / "crc.zip"
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"crc\.zip is corrupt"):
        extract_archive(archive, tmp_path / "out")
    assert _leftovers(tmp_path) == ["crc.zip"]


def test_tar_gz_and_truncated_tar_gz(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = bytes(range(256)) * 400
        info = tarfile.TarInfo("corpus/train.en")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    good = tmp_path / "c.tar.gz"
    good.write_bytes(buf.getvalue())
    out = extract_archive(good, tmp_path / "c")
    assert (out / "corpus" / "train.en").stat().st_size == 256 * 400
    bad = tmp_path / "t.tar.gz"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UserError, match=r"t\.tar\.gz is corrupt or truncated"):
        extract_archive(bad, tmp_path / "t")
    assert _leftovers(tmp_path) == ["c", "c.tar.gz", "t.tar.gz"]


def test_extract_refuses_existing_destination(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(ZIP)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        extract_archive(archive, tmp_path / "out")


def test_temporary_file_is_private_to_the_download(server, tmp_path):
    """The in-progress file is named after the whole destination name: fetching train.en neither
    writes nor (on failure) deletes a train.part that belongs to someone else (e.g. train.vi's)."""
    other = tmp_path / "train.part"
    other.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match="failed"):
        download_url(f"{server}/missing.zip", tmp_path / "train.en", None, progress=False)
    assert other.read_bytes() == b"someone else's file"
    download_url(f"{server}/tiny.zip", tmp_path / "train.en", hashlib.sha256(ZIP).hexdigest(), progress=False)
    assert other.read_bytes() == b"someone else's file"
    assert _leftovers(tmp_path) == ["train.en", "train.part"]
