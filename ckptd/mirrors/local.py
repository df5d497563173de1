"""A local folder or NFS mount as a mirror target.

A copy goes to a temp file in the target folder with copy_file_range (the kernel copies, no userspace
buffer), is fsynced and renamed into place, then the folder is fsynced. The read-back that proves the copy
runs alongside: a second thread hashes each piece of the destination as soon as it is written. Neither file
stays in the page cache (issue 13: a copy evicted the training job's whole dataset): the source's pages are
dropped as they are copied, the copy's once hashed and on disk, every _FLUSH bytes, so that the dirty pages of
a copy stay bounded; reads (`read_into`, `sha256`) drop behind them too (fsutil.drop_cache). A copy
killed half-way leaves its temp file (named by fsutil.temp_name, never listed as an object): `sweep` removes
those no copy has written to for an hour (the mirror thread sweeps at start-up and after each reconciliation).

Keys are untrusted (they come from index files and listings a hostile target can write), and so is the
folder's content: a key is a '/'-joined path of plain components (untrusted.relative), and every operation
walks down from the configured root one folder at a time without following links, then acts relative to
that folder's descriptor. A folder swapped for a link fails; nothing outside the root is read or written.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ckptd.fsutil import TEMP_MARK, atomic_write_bytes, drop_cache, open_regular, sync_and_drop, temp_name
from ckptd.mirrors import (
    SMALL_OBJECT_MAX,
    STALE_AFTER,
    IntegrityError,
    MirrorError,
    NotFound,
    Progress,
    RemoteObject,
)
from ckptd.throttle import Throttle
from ckptd.untrusted import UntrustedInput, relative

_PIECE = 16 << 20
_FLUSH = 64 << 20  # bytes of a copy written between two fdatasyncs, which let its pages leave the page cache
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LocalTarget:
    """Mirror target in a local folder."""

    def __init__(self, name: str, root: Path, settings: object = None) -> None:
        self.name = name
        self.root = root
        self.url = str(root)
        self._throttle = Throttle(float(getattr(settings, "max_bandwidth", 0) or 0))

    def _parts(self, key: str) -> tuple[str, ...]:
        try:
            return relative(key, what="key")
        except UntrustedInput as exc:
            raise MirrorError(f"{self.name}: key {key!r} points outside the target {self.root} ({exc})") from None

    @contextlib.contextmanager
    def _folder(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder `parts` below the root, reached without following links (created when
        `create`). Raises NotFound when a folder is missing, MirrorError when one is a link or not a folder."""
        try:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, _DIR)
        except FileNotFoundError:
            raise NotFound(f"{self.name}: the target folder {self.root} does not exist") from None
        except OSError as exc:
            raise MirrorError(f"{self.name}: the target folder {self.root} is unusable: {exc}") from exc
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                below = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = below
        except OSError as exc:
            os.close(fd)
            where = f"{self.name}:{'/'.join(parts)}"
            if isinstance(exc, FileNotFoundError):
                raise NotFound(f"{where} does not exist") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise MirrorError(f"{where} is a link or no folder; not followed") from None
            raise MirrorError(f"{where}: {exc}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _open(self, key: str) -> int:
        """A read-only descriptor of the regular file at `key`. Raises NotFound, MirrorError."""
        parts = self._parts(key)
        with self._folder(parts[:-1]) as folder:
            try:
                return open_regular(parts[-1], dir_fd=folder)
            except FileNotFoundError:
                raise NotFound(f"{self.name}:{key} does not exist") from None
            except OSError as exc:
                raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Progress | None = None) -> None:
        """Copy and prove the copy (see the protocol in ckptd.mirrors)."""
        parts = self._parts(key)
        with self._folder(parts[:-1], create=True) as folder:
            temp = temp_name(parts[-1])
            try:
                actual = self._copy_and_hash(source, folder, temp, progress)
                if actual != sha256:
                    raise IntegrityError(f"{self.name}:{key}: copy has sha256 {actual}, expected {sha256}")
                os.replace(temp, parts[-1], src_dir_fd=folder, dst_dir_fd=folder)
                os.fsync(folder)
            except OSError as exc:
                raise MirrorError(f"{self.name}:{key}: {exc}") from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=folder)

    def _copy_and_hash(self, source: Path, folder: int, temp: str, progress: Progress | None) -> str:
        """Copy `source` to `temp` in `folder` and return the SHA-256 of what `temp` holds, read back as it is
        written; both files' pages are dropped from the page cache on the way (see the module)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(temp, flags, 0o644, dir_fd=folder)
        back = _ReadBack(os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder), temp)
        try:
            with open(source, "rb") as src:
                back.start()
                try:
                    self._copy(src.fileno(), dst, source, back, progress)
                    os.fsync(dst)
                finally:
                    back.finish()
                drop_cache(dst)  # on disk now: all of it goes
        finally:
            os.close(dst)
            os.close(back.fd)
        if back.failure:
            raise back.failure[0]
        return back.digest.hexdigest()

    def _copy(self, src: int, dst: int, source: Path, back: _ReadBack, progress: Progress | None) -> None:
        size = os.fstat(src).st_size
        written = flushed = 0
        while written < size:
            moved = _copy_range(src, dst, min(_PIECE, size - written), written)
            if moved == 0:
                raise OSError(f"{source} shrank while being copied")
            drop_cache(src, written, moved)
            written += moved
            back.wrote(written)
            self._throttle(moved)
            if progress is not None:
                progress(moved)
            if written - flushed >= _FLUSH:
                back.wait()  # hashed from the cache first, then on disk and dropped
                sync_and_drop(dst, flushed, written - flushed)
                flushed = written

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object atomically."""
        parts = self._parts(key)
        with self._folder(parts[:-1], create=True):
            pass  # its folders exist, and none of them is a link; the write walks down again without following one
        try:
            atomic_write_bytes(self.root.joinpath(*parts), data, root=self.root)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise MirrorError(
                    f"{self.name}:{key}: a folder on the way is a link or no folder; not followed"
                ) from None
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def read_into(self, key: str, out: int, progress: Progress | None = None) -> None:
        """Copy the object's bytes into the open file `out`, from its start."""
        fd = self._open(key)
        try:
            size = os.fstat(fd).st_size
            copied = flushed = 0
            while copied < size:
                moved = _copy_range(fd, out, min(_PIECE, size - copied), copied)
                if moved == 0:
                    break
                drop_cache(fd, copied, moved)
                copied += moved
                if copied - flushed >= _FLUSH:  # the caller fsyncs and hashes `out`; its dirty pages stay bounded
                    sync_and_drop(out, flushed, copied - flushed)
                    flushed = copied
                if progress is not None:
                    progress(moved)
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        finally:
            os.close(fd)

    def get_bytes(self, key: str) -> bytes:
        """Read a small object (at most SMALL_OBJECT_MAX bytes)."""
        fd = self._open(key)
        try:
            data = os.read(fd, SMALL_OBJECT_MAX + 1)
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) > SMALL_OBJECT_MAX:
            raise MirrorError(f"{self.name}:{key} is over {SMALL_OBJECT_MAX} bytes; not a ckptd index or sidecar")
        return data

    def sha256(self, key: str) -> str:
        """Read the object back and hash it."""
        digest = hashlib.sha256()
        fd = self._open(key)
        try:
            at = 0
            while piece := os.pread(fd, _PIECE, at):
                drop_cache(fd, at, len(piece))
                digest.update(piece)
                at += len(piece)
                self._throttle(len(piece))
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        finally:
            os.close(fd)
        return digest.hexdigest()

    def stat(self, key: str) -> RemoteObject | None:
        """Size of an object, or None (a link or anything but a regular file is no object)."""
        parts = self._parts(key)
        try:
            with self._folder(parts[:-1]) as folder:
                found = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except (NotFound, FileNotFoundError):
            return None
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        return RemoteObject(key, found.st_size) if stat.S_ISREG(found.st_mode) else None

    def delete(self, key: str) -> None:
        """Delete; missing is fine. Run folders left empty are removed, never the root."""
        parts = self._parts(key)
        try:
            with self._folder(parts[:-1]) as folder, contextlib.suppress(FileNotFoundError):
                os.unlink(parts[-1], dir_fd=folder)
        except NotFound:
            return
        for depth in range(len(parts) - 1, 0, -1):  # tidy now-empty folders, deepest first
            try:
                with self._folder(parts[: depth - 1]) as parent:
                    os.rmdir(parts[depth - 1], dir_fd=parent)
            except (OSError, MirrorError):
                return

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys of regular files that start with `prefix` (a plain string prefix, as in S3), sorted; temp files
        and links are no objects."""
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._parts(folder) if folder else ()
        keys: builtins.list[str] = []
        try:
            with self._folder(start) as fd:
                self._walk(fd, "/".join(start), prefix, keys)
        except NotFound:
            return iter(())
        except OSError as exc:  # unreadable, a stale NFS handle: the target fails, never the caller
            raise MirrorError(f"{self.name}: cannot list {self.root}: {exc}") from exc
        return iter(sorted(keys))

    def _walk(self, fd: int, at: str, prefix: str, keys: builtins.list[str]) -> None:
        for name in os.listdir(fd):
            key = f"{at}/{name}" if at else name
            try:
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            except FileNotFoundError:  # a temp file renamed into place meanwhile: listed under its new name
                continue
            if stat.S_ISDIR(mode) and (key.startswith(prefix) or prefix.startswith(key + "/")):
                try:
                    below = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    continue
                try:
                    self._walk(below, key, prefix, keys)
                finally:
                    os.close(below)
            elif stat.S_ISREG(mode) and TEMP_MARK not in name and key.startswith(prefix):
                keys.append(key)

    def sweep(self, idle_for: float = STALE_AFTER) -> builtins.list[str]:
        """Remove temp files (fsutil.temp_name: a copy or an index write killed half-way) not written to for
        `idle_for` seconds, anywhere below the root, through no link; nothing else (see the protocol)."""
        removed: builtins.list[str] = []
        try:
            with self._folder(()) as fd:
                self._sweep(fd, "", time.time() - idle_for, removed)
        except NotFound:
            return []
        except OSError as exc:
            raise MirrorError(f"{self.name}: cannot sweep {self.root}: {exc}") from exc
        return removed

    def _sweep(self, fd: int, at: str, before: float, removed: builtins.list[str]) -> None:
        for name in os.listdir(fd):
            key = f"{at}/{name}" if at else name
            try:
                found = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(found.st_mode):
                    below = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
                    try:
                        self._sweep(below, key, before, removed)
                    finally:
                        os.close(below)
                elif stat.S_ISREG(found.st_mode) and TEMP_MARK in name and found.st_mtime <= before:
                    os.unlink(name, dir_fd=fd)
                    removed.append(f"{self.name}:{key} ({found.st_size} bytes)")
            except FileNotFoundError:
                continue  # gone meanwhile: a copy finished or cleaned up after itself


class _ReadBack:
    """Hashes a file as it is written, on its own thread, from its start to as far as the writer says (`wrote`)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.digest = hashlib.sha256()
        self.failure: list[BaseException] = []
        self._written = self._hashed = 0
        self._done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ckptd-readback", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wrote(self, upto: int) -> None:
        """The file holds its bytes up to offset `upto` now."""
        with self._changed:
            self._written = upto
            self._changed.notify_all()

    def wait(self) -> None:
        """Wait until all that was written is hashed (or the read-back failed)."""
        with self._changed:
            self._changed.wait_for(lambda: self._hashed >= self._written or bool(self.failure))

    def finish(self) -> None:
        """Let the read-back hash what is left, and wait for it."""
        with self._changed:
            self._done = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._written > self._hashed or self._done)
                    limit, hashed = self._written, self._hashed
                    if self._done and hashed >= limit:
                        return
                while hashed < limit:
                    piece = os.pread(self.fd, min(_PIECE, limit - hashed), hashed)
                    if not piece:
                        raise OSError(f"{self.name} is shorter than what was written")
                    self.digest.update(piece)
                    hashed += len(piece)
                    with self._changed:
                        self._hashed = hashed
                        self._changed.notify_all()
        except BaseException as exc:
            with self._changed:
                self.failure.append(exc)
                self._changed.notify_all()


def _copy_range(src: int, dst: int, count: int, offset: int) -> int:
    """copy_file_range where the kernel offers it, else a plain read and write."""
    try:
        return os.copy_file_range(src, dst, count, offset, offset)
    except OSError:
        data = os.pread(src, count, offset)
        return os.pwrite(dst, data, offset)
