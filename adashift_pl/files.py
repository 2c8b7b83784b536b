"""Writing and reading the small files of runs and sweeps, safely.

A crash (or a killed process) must never leave a half-written summary.json, config.yaml,
checkpoint or sweep record: every write goes to a temporary file beside the target, is
fsynced, then renamed into place. Kept free of torch/Lightning imports so the sweep
tools load fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open() would give; mkstemp makes 0600 files


def atomic_write(path: Path, write, binary: bool) -> None:
    """write(f) into a temporary file beside `path`, fsync, then os.replace it into place: a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (e.g. a run still starting)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
