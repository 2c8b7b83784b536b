"""Download + checksum + atomic extract: the one way a data set gets onto disk.

The rule (DESIGN.md, issue 5): a failed or interrupted download never leaves a
half-written file or data set behind. So

* `download_url` streams into a temporary `.<dest name>.<random>.part` file (same
  directory, hence same file system; unique, so two processes fetching into one
  shared directory, or two files with the same stem, never write the same file), checks the byte count and the digest while streaming, and only then
  `os.replace`s the file into place. Any failure -- HTTP error, short read,
  checksum mismatch, Ctrl-C -- deletes the `.part` file.
* `extract_archive` unpacks into a temporary sibling directory and renames it
  to `dest_dir` in one `os.replace`; a corrupt or truncated archive raises a
  `UserError` naming the file and the temporary directory is removed.

Both are plain functions of paths so the vision and NMT data modules (and their
tests, which serve files from a 127.0.0.1 http.server) share them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path

from adashift_pl.errors import UserError

__all__ = ["download_url", "extract_archive", "file_digest", "check_file", "temporary_sibling"]

_CHUNK = 1 << 20  # 1 MiB per read: large enough to be fast, small enough for progress


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (works for multi-GB archives)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: str | os.PathLike, *, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise UserError naming the file, the expected and the actual digest if it does not match."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual.lower() != expected.lower():
            raise UserError(
                f"checksum mismatch for {path}: expected {algorithm} {expected}, got {actual} "
                f"(the file is corrupt or incomplete: delete it and download again)"
            )


def temporary_sibling(dest: Path) -> Path:
    """A fresh `.<name>.<random>.part` path beside `dest` (same file system, so `os.replace` is atomic).

    Unique per call: `dest.with_suffix(".part")` would make train.en and train.vi share
    train.part, and two processes (jobs of a sweep, nodes sharing a data directory) fetching or
    unpacking the same file would write into one. A random name rather than mkstemp, so the
    file gets the umask's permissions (mkstemp's are 0600)."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")


def download_url(url: str, dest: str | os.PathLike, sha256: str | None = None, *,
                 md5: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` atomically and verify it; return `dest`.

    sha256 / md5: expected hex digests (either, both or none; sha256 preferred --
    md5 exists because some data sets, e.g. Tiny-ImageNet, only publish md5).
    An existing `dest` is verified and kept (no second download); if it does not
    match, that is a UserError naming the file -- we do not delete user files.
    """
    dest = Path(dest)
    if dest.exists():
        check_file(dest, sha256=sha256, md5=md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = temporary_sibling(dest)
    hashers = {name: hashlib.new(name) for name, want in (("sha256", sha256), ("md5", md5)) if want}
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http(s) URLs from our configs)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise UserError(f"download of {url} failed: {err}; nothing was written to {dest}") from err
        with response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.0
            if progress:
                size = f" ({total / 2**20:.1f} MiB)" if total else ""
                print(f"downloading {url}{size} -> {dest}", file=sys.stderr, flush=True)
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, ValueError) as err:  # connection reset, http.client.IncompleteRead
                    raise UserError(f"download of {url} failed after {done} bytes: {err}; "
                                    f"nothing was written to {dest}") from err
                if not chunk:
                    break
                out.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                done += len(chunk)
                if progress and total and done / total >= next_report:
                    print(f"  {100 * done / total:5.1f}%  {done / 2**20:.1f} MiB", file=sys.stderr, flush=True)
                    next_report += 0.1
        if total and done != total:
            raise UserError(f"download of {url} is truncated: got {done} of {total} bytes; "
                            f"nothing was written to {dest}")
        for name, h in hashers.items():
            expected = sha256 if name == "sha256" else md5
            if h.hexdigest().lower() != expected.lower():
                raise UserError(f"checksum mismatch for {dest} (from {url}): expected {name} {expected}, "
                                f"got {h.hexdigest()}; the download was deleted")
        os.replace(part, dest)
    except BaseException:  # including KeyboardInterrupt: never leave the .part behind
        part.unlink(missing_ok=True)
        raise
    return dest


def extract_archive(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Unpack a .zip or .tar[.gz|.bz2|.xz] so that its members end up in `dest_dir`; return it.

    `dest_dir` must not exist yet: the archive is unpacked into a temporary
    sibling directory which is then renamed to `dest_dir` in one step, so a
    reader sees either nothing or the complete tree. A corrupt or truncated
    archive raises a UserError naming it and leaves nothing behind.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if dest_dir.exists():
        raise UserError(f"cannot extract {archive}: {dest_dir} already exists (delete it to extract again)")
    if not archive.is_file():
        raise UserError(f"cannot extract {archive}: no such file")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.extracting-", dir=dest_dir.parent))
    try:
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)  # checks each member's CRC; ZipFile sanitises "../" and absolute names
            else:
                with tarfile.open(archive, "r:*") as tf:
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links/paths outside tmp
                        tf.extractall(tmp, filter="data")
                    else:  # pragma: no cover - older Pythons
                        tf.extractall(tmp)
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as err:
            raise UserError(f"archive {archive} is corrupt or truncated ({type(err).__name__}: {err}); "
                            f"delete it and download again") from err
        os.replace(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest_dir
