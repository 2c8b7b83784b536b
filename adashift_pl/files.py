"""Writing and reading the small files of runs and sweeps, safely.

A crash (or a killed process) must never leave a half-written summary.json, config.yaml,
checkpoint or sweep record: every write goes to a temporary file beside the target, is
fsynced, then renamed into place. A write that fails (disk full, read-only directory)
raises WriteError, one line naming the file, and leaves the previous file as it was.
Checkpoints also get a sha256 "digest file" beside them (`last.ckpt.sha256`, in
`sha256sum -c` format) so that a file whose bytes changed later is detected before it is
loaded. Kept free of torch/Lightning imports so the sweep tools load fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

DIGEST_SUFFIX = ".sha256"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp makes 0600 files


class WriteError(OSError):
    """A file could not be written (disk full, read-only, ...); the previous version is kept.
    str() is the one line for the user: "cannot write PATH: No space left on device"."""

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch.save reports a failed write as a RuntimeError raised while
    handling the OSError ("unexpected pos ..."), so look along the exception's context too."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _temporary_name(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, write, binary: bool, before_replace=None) -> None:
    """write(f) into a temporary file beside `path`, fsync, then os.replace it into place: a crash
    leaves either the old file or the new one, never half of one. A failed write raises WriteError
    (the old file stays); any other error from write(f) propagates as it is. `before_replace()`
    runs after the new contents are safely on disk, just before the rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_name(path), suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        cause = _os_error_in(e)
        if cause is None or isinstance(e, WriteError):
            raise
        raise WriteError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (e.g. a run still starting)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---- checkpoints with a digest ---------------------------------------------------------------
class _Hashing:
    """A write-only file object that hashes what passes through it (one pass over the bytes)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def digest_path(path: Path) -> Path:
    return Path(f"{path}{DIGEST_SUFFIX}")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def read_digests(path: Path) -> list[str] | None:
    """The digests the digest file accepts for `path` (None: there is no digest file)."""
    try:
        text = digest_path(path).read_text()
    except FileNotFoundError:
        return None
    return re.findall(r"^([0-9a-f]{64}) ", text, flags=re.M)


def _write_digests(path: Path, digests: list[str]) -> None:
    atomic_write_text(digest_path(path), "".join(f"{d}  {path.name}\n" for d in digests))


def atomic_write_with_digest(path: Path, write) -> None:
    """atomic_write(binary) plus `path.sha256`, consistent with each other after a crash at any point.

    Two files cannot be renamed at once, so the digest file first accepts both the old and the
    new contents, then the checkpoint is replaced, then the old digest is dropped.
    """
    path = Path(path)
    sha = {}

    def write_hashed(f):
        h = _Hashing(f)
        write(h)
        sha["new"] = h.sha.hexdigest()

    def accept_both():
        # a checkpoint written without a digest file (older runs): accept its current contents too
        old = (read_digests(path) or [file_sha256(path)]) if path.exists() else []
        _write_digests(path, [sha["new"], *old])

    atomic_write(path, write_hashed, binary=True, before_replace=accept_both)
    _write_digests(path, [sha["new"]])


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` must not be loaded (its bytes changed since it was written),
    or None when it matches its digest file or has none (a checkpoint from elsewhere)."""
    path = Path(path)
    accepted = read_digests(path)
    if accepted is None:
        return None
    actual = file_sha256(path)
    if actual in accepted:
        return None
    return (f"checkpoint {path} is corrupt: its sha256 {actual[:16]}... does not match the digest written with "
            f"it ({digest_path(path).name}), so its bytes changed after it was saved "
            f"(size now {path.stat().st_size} bytes)")


def remove_with_digest(path: Path) -> None:
    for p in (Path(path), digest_path(Path(path))):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def orphan_temporaries(directory: Path) -> list[Path]:
    """Temporary files atomic_write left in `directory` when its process was killed (kill -9)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and re.fullmatch(r"\..+\..+\.tmp", p.name))
