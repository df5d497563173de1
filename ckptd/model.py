"""Value types shared by every part of ckptd. No I/O here.

A `Verification` is what the verify engine says about one checkpoint (a file or a directory); it is what
`ckptd verify --json` prints, what the sidecar stores and what the catalog indexes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

Status = Literal["ok", "corrupt", "unsafe", "unsupported"]
STATUSES: tuple[Status, ...] = ("ok", "corrupt", "unsafe", "unsupported")

Format = Literal["torch_zip", "torch_legacy", "safetensors", "safetensors_sharded", "dcp", "orbax"]


class Identity(NamedTuple):
    """What tells that a checkpoint changed: total size, newest mtime (ns), inode and device.

    Two identities are equal only when all four are: a file replaced by another (a new inode), rewritten
    (a new mtime) or moved to another file system (a new device) is another checkpoint. (A NamedTuple, not a
    dataclass: retention builds one per checkpoint, 100,000 per plan in benchmarks/retention.py.)
    """

    size: int
    mtime_ns: int
    inode: int
    device: int = 0

    @property
    def mtime(self) -> float:
        """The mtime in seconds, computed one way everywhere so that equality checks hold."""
        return self.mtime_ns / 1e9


@dataclass(frozen=True)
class TensorStats:
    """Counts over every tensor of a checkpoint.

    `bytes` counts each storage once, so tied weights are not counted twice; `nonfinite` is the number of
    floating-point tensors holding at least one NaN or Inf.
    """

    count: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    nonfinite: int = 0


@dataclass(frozen=True)
class Verification:
    """The verify engine's record of one checkpoint."""

    path: str
    status: Status
    format: Format | None
    size_bytes: int
    sha256: str | None
    mtime: float
    inode: int
    mtime_ns: int = 0  # the exact mtime: `mtime` as a float cannot round-trip nanoseconds
    device: int = 0  # st_dev: with inode, size and mtime_ns, what retention checks before it deletes
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unsafe_globals: list[str] = field(default_factory=list)
    epoch: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    producer: str | None = None
    keys: list[str] = field(default_factory=list)
    tensors: TensorStats = field(default_factory=TensorStats)
    files: dict[str, str] | None = None
    seconds: float = 0.0
    layout: str | None = None  # the trainer layout of a folder checkpoint (ckptd.layouts), None for a file
    # Names of checkpoints beside this one that its trainer's records say it still needs (its best): kept.
    needs: list[str] = field(default_factory=list)
    # Holds an optimizer's state to resume training from (False: weights only); None in sidecars written before
    # ckptd recorded it, which count as resumable.
    resumable: bool | None = None

    @property
    def is_directory(self) -> bool:
        """True for directory checkpoints (DCP, sharded safetensors), which carry a `files` map."""
        return self.files is not None

    def to_dict(self) -> dict[str, Any]:
        """Return the record as plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verification:
        """Build a record from `to_dict`'s output (extra keys, such as a sidecar's, are ignored).

        Raises KeyError or TypeError when a required field is missing or of the wrong shape.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["tensors"] = TensorStats(**data.get("tensors", {}))
        return cls(**values)


class CheckpointChanged(Exception):
    """The checkpoint changed while it was being verified: it is still being written. Retry later."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path, detail)  # both in args, so the exception survives pickling between processes
        self.path = path
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


@dataclass(frozen=True)
class Entry:
    """A checkpoint as the selection and retention logic see it, from a sidecar or a catalog row."""

    path: str
    run: str
    status: str | None
    size: int
    mtime: float
    sha256: str | None = None
    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    pinned: bool = False
    format: str | None = None
    verified: bool = True  # False while the checkpoint is not yet verified (or changed since)
    # The identity it was verified with: a deletion planned from this entry removes exactly these bytes.
    mtime_ns: int = 0
    inode: int = 0
    device: int = 0
    needs: tuple[str, ...] = ()  # names beside it the trainer still needs (see Verification.needs)
    resumable: bool | None = None  # see Verification.resumable

    @property
    def identity(self) -> Identity:
        """The identity the checkpoint was verified with."""
        return Identity(self.size, self.mtime_ns, self.inode, self.device)

    @classmethod
    def of(cls, verification: Verification, run: str, pinned: bool = False, verified: bool = True) -> Entry:
        """The entry of a verification record; `verified=False` when its checkpoint changed since."""
        v = verification
        return cls(
            path=v.path, run=run, status=v.status, size=v.size_bytes, mtime=v.mtime, sha256=v.sha256,
            epoch=v.epoch, step=v.global_step, metrics=dict(v.metrics), pinned=pinned, format=v.format,
            verified=verified, mtime_ns=v.mtime_ns, inode=v.inode, device=v.device, needs=tuple(v.needs),
            resumable=v.resumable,
        )  # fmt: skip
