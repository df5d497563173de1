"""One reconciliation pass over a watched folder: the daemon's work, done once.

Given a folder, its patterns and a catalog: verify every checkpoint that is new or changed (an unchanged
size, mtime and inode is never hashed again), write its sidecar, record it in the catalog, record links,
mark vanished checkpoints gone and remove their sidecars. `ckptd scan` calls this; so does the daemon at
start-up, on a schedule and after an observer error.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ckptd import __version__, discover, sidecar
from ckptd.catalog import Catalog
from ckptd.discover import Candidate
from ckptd.model import CheckpointChanged, Verification

Verifier = Callable[[Path], Verification]
"""Verifies one checkpoint; may raise CheckpointChanged."""


@dataclass
class ScanReport:
    """What one pass did."""

    verified: list[Verification] = field(default_factory=list)
    unchanged: int = 0
    links: int = 0
    busy: list[str] = field(default_factory=list)  # changed while read: still being written, retried later
    gone: list[str] = field(default_factory=list)
    removed_sidecars: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # could not be read at all (permissions, I/O errors)

    def by_status(self) -> Counter[str]:
        """How many checkpoints verified in this pass ended in each status."""
        return Counter(v.status for v in self.verified)


@dataclass(frozen=True)
class Outcome:
    """What processing one candidate did: verified it, found it unchanged, or found it still being written."""

    verification: Verification | None = None
    unchanged: bool = False
    busy: str | None = None


def sidecar_bytes(verification: Verification, engine: dict[str, str], now: float, pinned: bool = False) -> bytes:
    """Render the sidecar of a fresh verification on this host."""
    return sidecar.render(
        verification,
        verified_at=datetime.fromtimestamp(now, UTC),
        host=socket.gethostname(),
        ckptd_version=__version__,
        engine=engine,
        pinned=pinned,
    )


def process(
    candidate: Candidate,
    *,
    watch: str,
    catalog: Catalog,
    verifier: Verifier,
    engine: Callable[[], dict[str, str]],
    now: Callable[[], float] = time.time,
    force: bool = False,
) -> Outcome:
    """Bring one checkpoint's sidecar and catalog row up to date.

    Links are recorded as pointers to their target and never hashed. Returns what was done. Raises
    OSError when the checkpoint cannot be read (it vanished, or permissions).
    """
    found = discover.identity(candidate.path)
    path = str(candidate.path)
    if candidate.kind == "link":
        assert candidate.link_target is not None
        catalog.record_link(
            watch=watch, run=str(candidate.run), path=path, target=str(candidate.link_target),
            size=found.size, mtime_ns=found.mtime_ns, inode=found.inode, now=now(),
        )  # fmt: skip
        return Outcome(unchanged=True)
    has_sidecar = sidecar.sidecar_path(candidate.path).exists()
    if not force and has_sidecar and catalog.unchanged(path, found.size, found.mtime_ns, found.inode):
        return Outcome(unchanged=True)
    try:
        verification = verifier(candidate.path)
    except CheckpointChanged as exc:
        return Outcome(busy=exc.detail)
    row = catalog.get(path)
    pinned = row.pinned if row else False
    sidecar.write(candidate.path, sidecar_bytes(verification, engine(), now(), pinned))
    catalog.record_verified(
        watch=watch, run=str(candidate.run), verification=verification,
        mtime_ns=round(verification.mtime * 1e9), now=now(),
    )  # fmt: skip
    return Outcome(verification=verification)


def reconcile(
    root: Path,
    *,
    watch: str,
    patterns: Sequence[str],
    catalog: Catalog,
    verifier: Verifier,
    engine: Callable[[], dict[str, str]],
    now: Callable[[], float] = time.time,
    on_outcome: Callable[[Candidate, Outcome], None] | None = None,
) -> ScanReport:
    """Compare `root` on disk with the catalog and bring the catalog and sidecars up to date."""
    report = ScanReport()
    seen: set[str] = set()
    for candidate in discover.discover(root, patterns):
        seen.add(str(candidate.path))
        try:
            outcome = process(candidate, watch=watch, catalog=catalog, verifier=verifier, engine=engine, now=now)
        except FileNotFoundError:
            seen.discard(str(candidate.path))
            continue
        except OSError as exc:
            report.failed.append(f"{candidate.path}: {exc}")
            continue
        if candidate.kind == "link":
            report.links += 1
        elif outcome.verification is not None:
            report.verified.append(outcome.verification)
        elif outcome.busy:
            report.busy.append(str(candidate.path))
        else:
            report.unchanged += 1
        if on_outcome is not None:
            on_outcome(candidate, outcome)
    for row in catalog.present(under=str(root)):
        if row.path not in seen and not Path(row.path).exists():
            catalog.mark_gone(row.path, now())
            report.gone.append(row.path)
    for orphan in discover.orphan_sidecars(root):
        orphan.unlink(missing_ok=True)
        report.removed_sidecars.append(str(orphan))
    return report
