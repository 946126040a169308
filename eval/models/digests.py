"""Content hashes of files and the fingerprint of a model's weights.

A model's weights are fingerprinted by their content (:func:`weights_fingerprint`): what the
attention cache's key, a resume and the ledger's ``model_hash`` compare.

Hashing SD's 2-5 GB of weights on every run would cost seconds; the SHA-256 of a file is kept in
``<home>/outputs/.file_hashes.json`` under its absolute path with the size, mtime (ns) and inode it
had, and read back while all three are the same. Any write through the filesystem (a new file, an
in-place edit, a copy over it) changes the mtime or the inode; only an edit that restores the old
mtime on purpose (``touch -r``) would go unseen. The record is rewritten atomically; two runs
updating it at once can lose one another's entries, which only costs hashing that file again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eval import home
from eval.atomic import write_json_atomic

CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """The ``algorithm`` (``hashlib`` name) digest (hex) of the file at ``path``, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def _short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(model: Mapping[str, Any]) -> str:
    """A fingerprint of the weights a model config loads, where it can be known without loading.

    A local diffusers folder: a hash of every config's text and every other file's SHA-256
    (:func:`file_sha256`: computed once per file version, then read back by its size,
    mtime and inode), so weights replaced in place change it. A hub id: ``hub:<commit>`` of the
    cached snapshot (empty when it is not cached yet). A model built from its config
    (``model=tiny``): a hash of that config.
    """
    source = model.get("model")
    if source is None:
        return "config:" + _short_sha(json.dumps(dict(model), sort_keys=True, default=str))
    path = Path(str(source)).expanduser()
    if path.is_dir():
        parts = []
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.name.endswith((".json", ".safetensors", ".bin", ".txt")):
                rel = f.relative_to(path).as_posix()
                body = f.read_text(errors="replace") if f.suffix == ".json" else file_sha256(f)
                parts.append(f"{rel}:{body}")
        return "dir:" + _short_sha("\n".join(parts))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "model_index.json", model.get("revision"))
    except Exception:  # an unusable cache is no provenance, not a failed run
        return ""
    return f"hub:{Path(cached).parent.name}" if isinstance(cached, str) else ""
