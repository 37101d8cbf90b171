"""Writing files so that a reader never sees half of one and a crash never leaves one."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

__all__ = ["remove_stale_temporaries", "sha256_file", "write_text_atomic"]

# ``.{name}.{pid}.{hex}.tmp``: the writer's pid tells a live writer from a dead one.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary file is opened with mode 0o666 so the umask decides the final mode, as
    for any file the user writes (``tempfile.mkstemp`` would make it owner-only). A
    failure is reported with ``path`` alone: the temporary name means nothing to a user.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, target.name)
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise OSError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
        raise
    return target


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary files in ``folder`` left by writers that died (e.g. SIGKILL).

    Only files of our own pattern whose writer process no longer exists are removed, so
    a write in progress in another process is never disturbed. ``name`` limits it to the
    temporaries of one target file.
    """
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if _alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another cleaner got there first, or it is not ours to remove
    return removed


def _alive(pid: int) -> bool:
    # On Windows os.kill(pid, 0) would terminate the process: never probe there.
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, under another user: leave its files alone
    return True


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read a megabyte at a time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
