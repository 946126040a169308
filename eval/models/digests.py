"""Content hashes of large files (model weights), computed once per version of a file.

Hashing SD's 2-5 GB of weights on every run would cost seconds; the SHA-256 of a file is kept in
``<home>/outputs/.file_hashes.json`` under its absolute path with the size, mtime (ns) and inode it
had, and read back while all three are the same. Any write through the filesystem (a new file, an
in-place edit, a copy over it) changes the mtime or the inode; only an edit that restores the old
mtime on purpose (``touch -r``) would go unseen. The record is rewritten atomically; two runs
updating it at once can lose one another's entries, which only costs hashing that file again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from eval import home
from eval.atomic import write_json_atomic
from eval.tools.download import file_digest


def hash_record() -> Path:
    """The file holding the known hashes: ``<home>/outputs/.file_hashes.json``."""
    return home() / "outputs" / ".file_hashes.json"


def _read(record: Path) -> dict[str, list]:
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: hashes are computed again
        return {}
    return known if isinstance(known, dict) else {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file at ``path``, from the record when its size, mtime and inode
    are those it was hashed with."""
    path = Path(path).resolve()
    st = path.stat()
    version = [st.st_size, st.st_mtime_ns, st.st_ino]
    record = hash_record()
    known = _read(record)
    entry = known.get(str(path))
    if isinstance(entry, list) and entry[:3] == version and len(entry) == 4:
        return entry[3]
    digest = file_digest(path, "sha256")
    st = path.stat()
    if [st.st_size, st.st_mtime_ns, st.st_ino] != version:  # written while read: keep nothing
        return digest
    known[str(path)] = [*version, digest]
    with contextlib.suppress(OSError):  # a read-only home: the hash is right, only not kept
        write_json_atomic(record, known)
    return digest
