"""File-system primitives that every writer and deleter goes through.

- Atomic writes: a temp file in the same folder, fsync, rename, fsync the folder. A reader, or a crash at any
  moment, sees either the old file or the new one, never half of one.
- Opening what others can write: `open_regular` never follows a final link and never opens a FIFO, socket
  or device (a FIFO would block the reader for good); `open_folder` walks down from a trusted root one
  component at a time without following links, so a folder swapped for a link mid-way fails instead of
  leading out of the tree. Callers then act relative to that descriptor (`dir_fd=`), never by path again.
- The page cache: `drop_cache` is the one place ckptd tells the kernel it is done with a file's pages. Every
  pass over a checkpoint's bytes (verify, mirror copies, scrub, restore) drops what it read behind it, so that
  verifying a 2 GB checkpoint does not push the training job's dataset out of the cache (issue 13).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from ckptd.untrusted import fit_name

TEMP_MARK = ".ckptd-tmp"
TRASH_PREFIX = ".ckptd-trash-"  # what the deletion executor moves a checkpoint to before removing it
_TOKEN_ROOM = len(".0123abcd" + TEMP_MARK)


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device, link or folder where a regular file was expected."""


def kind_of(mode: int) -> str:
    """A file type in words, for messages ('a FIFO', 'a symbolic link'...)."""
    for test, words in (
        (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):  # fmt: skip
        if test(mode):
            return words
    return "a special file"


def temp_name(name: str) -> str:
    """A hidden temp name for `name`, marked so that scans skip it and start-up can sweep it.

    Stays within NAME_MAX however long `name` is (see untrusted.fit_name).
    """
    return fit_name(name, f".{secrets.token_hex(4)}{TEMP_MARK}", prefix=".")


def temp_path_for(path: Path) -> Path:
    """A temp path beside `path` (see temp_name)."""
    return path.with_name(temp_name(path.name))


def fsync_dir(folder: Path | int) -> None:
    """fsync a folder (a path or an open descriptor) so that a rename inside it survives a power cut."""
    if isinstance(folder, int):
        os.fsync(folder)
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, *, root: Path | None = None) -> None:
    """Write `data` to `path` atomically. Raises OSError; on error no temp file is left behind.

    With `root` (a trusted folder above `path`, such as the watched folder), the folder of `path` is reached
    from `root` without following links (open_folder) and the write happens relative to it: a run folder
    swapped for a link meanwhile makes the write fail (ELOOP) rather than land elsewhere.
    """
    if root is None:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        rel = path.relative_to(root)
        if not rel.parts or ".." in rel.parts:
            raise ValueError(f"{path} is not inside {root}")
        folder = open_folder(root, rel.parts[:-1])
    temp = temp_name(path.name)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=folder)
        raise
    finally:
        os.close(folder)


def open_regular(path: Path | str, *, dir_fd: int | None = None, follow: bool = False) -> int:
    """Open a regular file for reading and return its descriptor.

    The final component is not followed when it is a link (unless `follow`), and a FIFO, socket or device
    is refused without blocking (O_NONBLOCK, then a check of what was opened). Raises NotRegularFile,
    FileNotFoundError or another OSError.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "is a symbolic link, which is not followed", str(path)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, f"is {kind_of(mode)}, not a regular file", str(path))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


@contextlib.contextmanager
def opened(path: Path | str, *, dir_fd: int | None = None, follow: bool = False) -> Iterator[int]:
    """`open_regular` as a context manager that closes the descriptor."""
    fd = open_regular(path, dir_fd=dir_fd, follow=follow)
    try:
        yield fd
    finally:
        os.close(fd)


def open_folder(root: Path, parts: Sequence[str] = ()) -> int:
    """Open `root` (trusted: it comes from the config), then each of `parts` below it without following links.

    Returns a descriptor of the last folder. Raises OSError (ELOOP or ENOTDIR where a part is a link or no
    folder, ENOENT where one is missing); no descriptor is left open on error.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_confined(root: Path, path: Path | str) -> int:
    """Open the regular file `path` below the trusted folder `root` without following any link on the way
    (see open_folder and open_regular); return its descriptor.

    A file reached through a run folder swapped for a link, however briefly, is never opened: ELOOP or
    ENOTDIR (NotRegularFile for the file itself), FileNotFoundError, ValueError when `path` is not below
    `root` at all.
    """
    rel = Path(path).relative_to(root)
    if not rel.parts or ".." in rel.parts:
        raise ValueError(f"{path} is not inside {root}")
    dir_fd = open_folder(root, rel.parts[:-1])
    try:
        return open_regular(rel.parts[-1], dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def unlink_confined(root: Path, path: Path) -> bool:
    """Delete the file `path` below `root`, reached without following any link (see open_folder); True if it
    was there. A link at `path` itself is removed, never what it points to. Raises OSError (ELOOP, ENOTDIR
    where a folder on the way is a link), ValueError when `path` is not below `root`."""
    rel = path.relative_to(root)
    if not rel.parts or ".." in rel.parts:
        raise ValueError(f"{path} is not inside {root}")
    dir_fd = open_folder(root, rel.parts[:-1])
    try:
        os.unlink(rel.parts[-1], dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)
    return True


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel that the pages of `fd` in [offset, offset+length) (to the end when `length` is 0) will not
    be read again: posix_fadvise(POSIX_FADV_DONTNEED).

    Clean pages no process has mapped leave the page cache at once; dirty ones are queued for writeback and stay
    (fdatasync first to drop them too); mapped ones stay until unmapped. Every page is dropped, also those that
    were cached before the caller read them: a checkpoint the trainer just wrote is not what its next steps
    read, its dataset is. Does nothing where the call is unsupported (not Linux, a file system without it).
    """
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def sync_and_drop(fd: int, offset: int = 0, length: int = 0) -> None:
    """fdatasync `fd`, then drop its pages in the range (see drop_cache): for writers, whose pages are dirty until
    they reach the disk. Raises OSError when the sync fails (the data may not be on disk)."""
    os.fdatasync(fd)
    drop_cache(fd, offset, length)


def sha256_fd(fd: int, chunk: int = 8 << 20) -> str:
    """The SHA-256 hex of an open file's bytes, read with pread from the start (memory stays flat), each piece
    dropped from the page cache once hashed (drop_cache; a file just written should be fsynced first)."""
    digest = hashlib.sha256()
    at = 0
    while piece := os.pread(fd, chunk, at):
        drop_cache(fd, at, len(piece))
        digest.update(piece)
        at += len(piece)
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """The SHA-256 hex of a regular file (a link or FIFO is refused: see open_regular)."""
    with opened(path) as fd:
        return sha256_fd(fd, chunk)
