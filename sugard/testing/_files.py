"""Files attached to the fake SugarCRM's records, kept on disk in a directory the fake owns.

Why on disk and streamed: tests of large transfers (hundreds of MB) must not cost the fake that
much memory, so bodies go through in CHUNK-sized pieces both ways. The directory is made at the
first upload and removed when the fake's app shuts down. Not thread-safe: the index is touched
under `FakeSugar`'s lock only, and the streaming itself works on files no one else writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

CHUNK: Final = 64 * 1024

FileKey = tuple[str, str, str]  # module, record id, field


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file: what a download answers with."""

    name: str
    content_type: str
    size: int
    path: Path


@dataclass
class FileStore:
    """The uploaded files by (module, record id, field)."""

    _files: dict[FileKey, StoredFile] = field(default_factory=dict)
    _directory: Path | None = None

    def new_path(self) -> Path:
        """A fresh file to stream an upload into (the directory is made on first use)."""
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="fake-sugar-files-"))
        fd, name = tempfile.mkstemp(dir=self._directory)
        os.close(fd)
        return Path(name)

    def put(self, key: FileKey, stored: StoredFile) -> None:
        """Attach a finished upload; the file it replaces is deleted."""
        old = self._files.get(key)
        self._files[key] = stored
        if old is not None:
            # A download still reading the old file keeps it open: unlinking is safe on POSIX.
            old.path.unlink(missing_ok=True)

    def get(self, key: FileKey) -> StoredFile | None:
        """The file attached to a record's field, if any."""
        return self._files.get(key)

    def drop_record(self, module: str, record_id: str) -> None:
        """Delete the files of a deleted record."""
        for key in [k for k in self._files if k[:2] == (module, record_id)]:
            self._files.pop(key).path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every file and the directory."""
        self._files.clear()
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


async def write_stream(path: Path, chunks: AsyncIterator[bytes]) -> int:
    """Stream chunks into `path`; returns the size. Removes the file if the stream breaks."""
    size = 0
    try:
        with path.open("wb") as out:
            async for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return size
