"""Download, verify and extract dataset archives (used by ``eval.tools.prepare``).

``download`` streams to ``<file>.part`` with a tqdm bar, resumes a partial ``.part`` with an HTTP
``Range`` request, checks the recorded size and md5/sha256, and renames atomically, so a file
under its final name is always complete and verified.  ``extract`` unpacks zip/tar members into a
folder and writes a marker, so a second run does nothing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.models.digests import file_digest

CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded or user-supplied file does not match its recorded size or checksum."""


def verify(
    path: Path, size: int | None = None, md5: str | None = None, sha256: str | None = None
) -> None:
    """Raise :class:`ChecksumError` naming the file, expected and actual values on a mismatch.
    Only what is recorded is checked (``None``: nothing recorded)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ChecksumError(f"{path}: size is {actual} bytes, expected {size}")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise ChecksumError(f"{path}: {algorithm} is {got}, expected {expected}")


def download(
    url: str,
    dest: Path,
    checks: Mapping[str, Any] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), verify it, and return ``dest``.

    ``checks``: what :func:`verify` checks (``size``, ``md5``, ``sha256``; absent: not checked).
    A ``dest`` that already exists is verified and kept.  A file that fails verification is
    deleted (resuming it could never fix it) and :class:`ChecksumError` says so.
    """
    dest, checks = Path(dest), dict(checks or {})
    size = checks.get("size")
    if dest.exists():
        verify(dest, **checks)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    # The way around a failed download: the file put where this one would have gone.
    by_hand = f"; or fetch it another way into {dest} and run the same command again"
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the .part already holds the whole file
            raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}{by_hand}") from e
        response = None
    except urllib.error.URLError as e:
        raise OSError(f"download of {url} failed: {e.reason} (no network?){by_hand}") from e
    if response is not None:
        with response:
            if offset and response.status != 206:  # server ignored Range: start over
                offset = 0
            length = response.headers.get("Content-Length")
            expected = offset + int(length) if length is not None else None
            with (
                open(part, "ab" if offset else "wb") as f,
                tqdm(
                    total=expected or size,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    disable=not progress,
                ) as bar,
            ):
                # read1 returns what has arrived, so an interrupted transfer keeps its bytes.
                while chunk := response.read1(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                received = f.tell()
            if expected is not None and received < expected:
                raise OSError(
                    f"download of {url} was interrupted at {received} of {expected} bytes; "
                    f"run again to resume from {part}"
                )
    try:
        verify(part, **checks)
    except ChecksumError as e:
        part.unlink()
        raise ChecksumError(
            f"download of {url} is corrupt ({e}); the partial file was deleted, run again to "
            "retry, and check the URL and the checksum recorded in conf/dataset/"
        ) from e
    os.replace(part, dest)
    return dest


def _selected(name: str, include: Sequence[str] | None) -> bool:
    return include is None or any(name.startswith(prefix) for prefix in include)


def extract(
    archive: Path, dest: Path, include: Sequence[str] | None = None, progress: bool = True
) -> int:
    """Unpack the members of a zip or tar ``archive`` whose path starts with one of ``include``
    (all when ``None``) into ``dest``; returns the number of files written."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in tqdm(
                z.infolist(), f"extract {archive.name}", unit="file", disable=not progress
            ):
                if _selected(info.filename, include):
                    z.extract(info, dest)  # zipfile strips absolute paths and '..'
                    count += not info.is_dir()
        return count
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            for member in tqdm(t, f"extract {archive.name}", unit="file", disable=not progress):
                if _selected(member.name, include):
                    t.extract(member, dest, filter="data")  # refuses paths outside dest
                    count += member.isfile()
        return count
    raise ValueError(f"{archive} is neither a zip nor a tar archive")


def place(path: Path, dest: Path) -> None:
    """Copy a plain (non-archive) source file to its place in the layout."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)
