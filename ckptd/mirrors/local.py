"""A local folder or NFS mount as a mirror target.

A copy goes to a temp file in the target folder with copy_file_range (the kernel copies, no userspace
buffer), is fsynced and renamed into place, then the folder is fsynced. The read-back that proves the copy
runs alongside: a second thread hashes each piece of the destination as soon as it is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ckptd.fsutil import atomic_write_bytes, fsync_dir, temp_path_for
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, Progress, RemoteObject
from ckptd.throttle import Throttle

_PIECE = 16 << 20


class LocalTarget:
    """Mirror target in a local folder."""

    def __init__(self, name: str, root: Path, settings: object = None) -> None:
        self.name = name
        self.root = root
        self.url = str(root)
        self._throttle = Throttle(float(getattr(settings, "max_bandwidth", 0) or 0))

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise MirrorError(f"key {key!r} points outside the target {self.root}")
        return path

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Progress | None = None) -> None:
        """Copy and prove the copy (see the protocol in ckptd.mirrors)."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = temp_path_for(target)
            try:
                actual = self._copy_and_hash(source, temp, progress)
                if actual != sha256:
                    raise IntegrityError(f"{self.name}:{key}: copy has sha256 {actual}, expected {sha256}")
                os.replace(temp, target)
            finally:
                temp.unlink(missing_ok=True)
            fsync_dir(target.parent)
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def _copy_and_hash(self, source: Path, temp: Path, progress: Progress | None) -> str:
        """Copy `source` to `temp` and return the SHA-256 of what `temp` holds, read back as it is written."""
        written = 0
        done = threading.Event()
        ready = threading.Condition()
        digest = hashlib.sha256()
        failure: list[BaseException] = []

        def read_back() -> None:
            hashed = 0
            try:
                with open(temp, "rb") as back:
                    while True:
                        with ready:
                            ready.wait_for(lambda: written > hashed or done.is_set())  # noqa: B023 (used at once)
                            limit = written
                        while hashed < limit:
                            piece = back.read(min(_PIECE, limit - hashed))
                            if not piece:
                                raise OSError(f"{temp} is shorter than what was written")
                            digest.update(piece)
                            hashed += len(piece)
                        if done.is_set() and hashed >= written:
                            return
            except BaseException as exc:
                failure.append(exc)

        with open(source, "rb") as src, open(temp, "xb") as dst:
            checker = threading.Thread(target=read_back, name="ckptd-readback", daemon=True)
            checker.start()
            try:
                size = os.fstat(src.fileno()).st_size
                while written < size:
                    moved = _copy_range(src.fileno(), dst.fileno(), min(_PIECE, size - written), written)
                    if moved == 0:
                        raise OSError(f"{source} shrank while being copied")
                    with ready:
                        written += moved
                        ready.notify()
                    self._throttle(moved)
                    if progress is not None:
                        progress(moved)
                os.fsync(dst.fileno())
            finally:
                with ready:
                    done.set()
                    ready.notify()
                checker.join()
        if failure:
            raise failure[0]
        return digest.hexdigest()

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object atomically."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def get_file(self, key: str, destination: Path, progress: Progress | None = None) -> None:
        """Download atomically."""
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"{self.name}:{key} does not exist")
        temp = temp_path_for(destination)
        try:
            with open(source, "rb") as src, open(temp, "xb") as dst:
                size = os.fstat(src.fileno()).st_size
                copied = 0
                while copied < size:
                    moved = _copy_range(src.fileno(), dst.fileno(), min(_PIECE, size - copied), copied)
                    if moved == 0:
                        break
                    copied += moved
                    if progress is not None:
                        progress(moved)
                os.fsync(dst.fileno())
            os.replace(temp, destination)
            fsync_dir(destination.parent)
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        """Read a small object."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.name}:{key} does not exist") from None
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def sha256(self, key: str) -> str:
        """Read the object back and hash it."""
        digest = hashlib.sha256()
        try:
            with open(self._path(key), "rb") as handle:
                while piece := handle.read(_PIECE):
                    digest.update(piece)
                    self._throttle(len(piece))
        except FileNotFoundError:
            raise NotFound(f"{self.name}:{key} does not exist") from None
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        return digest.hexdigest()

    def stat(self, key: str) -> RemoteObject | None:
        """Size of an object, or None."""
        try:
            return RemoteObject(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete; missing is fine."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # tidy now-empty run folders, never the root
                parent = path.parent
                while parent != self.root.resolve() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with `prefix` (a plain string prefix, as in S3), sorted; temp files are not objects."""
        base = self.root.resolve()
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(folder) if folder else base
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                key = (Path(dirpath) / name).relative_to(base).as_posix()
                if ".ckptd-tmp" not in name and key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))


def _copy_range(src: int, dst: int, count: int, offset: int) -> int:
    """copy_file_range where the kernel offers it, else a plain read and write."""
    try:
        return os.copy_file_range(src, dst, count, offset, offset)
    except OSError:
        data = os.pread(src, count, offset)
        return os.pwrite(dst, data, offset)
