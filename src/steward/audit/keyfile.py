"""Creating a secret file exactly once when several workers start at the same moment.

`os.open(O_CREAT | O_EXCL)` alone is not enough: the file exists (empty) before its creator has
written it, so a second worker that finds it and reads it at that moment sees a malformed key and
refuses to start (seen in CI: two gateway workers on a fresh data directory). The content is written
to a private temporary file first and hard-linked into place, which either publishes the complete
file or fails because another worker's complete file is already there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def create_private_file(path: Path, data: bytes) -> bool:
    """Write `data` to `path` (mode 0600) unless it exists. True when this call created it; False
    when another process did first (its file is then complete and is the one to use)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _create_exclusive(path, data)  # a filesystem without hard links
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True
