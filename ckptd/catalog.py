"""The catalog: a SQLite database (WAL mode) in the state folder, recording every checkpoint seen.

The only module that imports sqlite3. One row per checkpoint path; a checkpoint whose size, mtime and inode
are unchanged is never hashed again. Rows of deleted checkpoints are kept with `gone_at` set, so history
(and later the retention journal) stays queryable.

Any file name is a valid path, UTF-8 or not: Python hands undecodable bytes over as lone surrogates
(surrogateescape), which SQLite cannot store as text. Every text value is therefore stored through `encode`,
a one-to-one mapping that leaves valid UTF-8 without U+10FFFF untouched, and read back through `decode`.
It maps character by character, so a prefix of a path stays a prefix of its stored form.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.model import Entry, Identity, Verification

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    path        TEXT PRIMARY KEY,
    watch       TEXT NOT NULL,
    run         TEXT NOT NULL,
    kind        TEXT NOT NULL,            -- file, directory or link
    link_target TEXT,                     -- for links: the checkpoint they point to
    format      TEXT,
    status      TEXT,                     -- ok, corrupt, unsafe, unsupported; NULL until verified
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    inode       INTEGER NOT NULL,
    sha256      TEXT,
    epoch       INTEGER,
    step        INTEGER,
    metrics     TEXT NOT NULL DEFAULT '{}',
    problems    TEXT NOT NULL DEFAULT '[]',
    first_seen  REAL NOT NULL,
    verified_at REAL,
    gone_at     REAL,
    pinned      INTEGER NOT NULL DEFAULT 0,
    device      INTEGER NOT NULL DEFAULT 0,
    needs       TEXT NOT NULL DEFAULT '[]', -- JSON list: names beside it that its trainer still needs (its best)
    resumable   INTEGER                   -- 1: holds optimizer state, 0: weights only, NULL: not known
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (run);
CREATE INDEX IF NOT EXISTS checkpoints_watch ON checkpoints (watch);
CREATE INDEX IF NOT EXISTS checkpoints_links ON checkpoints (link_target) WHERE kind = 'link';
CREATE TABLE IF NOT EXISTS journal (
    id          INTEGER PRIMARY KEY,
    planned_at  REAL NOT NULL,
    done_at     REAL,
    state       TEXT NOT NULL,            -- pending (intent written, action not finished), done, skipped
    action      TEXT NOT NULL,            -- delete or quarantine
    watch       TEXT NOT NULL,
    run         TEXT NOT NULL,
    path        TEXT NOT NULL,
    sha256      TEXT,
    size        INTEGER NOT NULL,
    reasons     TEXT NOT NULL,            -- JSON list
    detail      TEXT                      -- where a quarantined checkpoint went, or why it was skipped
);
CREATE TABLE IF NOT EXISTS mirror_queue (
    target      TEXT NOT NULL,            -- the [mirror.NAME] it goes to
    path        TEXT NOT NULL,            -- the local checkpoint
    watch       TEXT NOT NULL,
    run         TEXT NOT NULL,
    role        TEXT NOT NULL,            -- best, latest, milestone or all (comma-joined when several)
    sha256      TEXT NOT NULL,
    state       TEXT NOT NULL,            -- pending, failed (retried with backoff), done, dropped
    copied      INTEGER NOT NULL DEFAULT 0, -- 1 once proved on the target (a role change then only rewrites the index)
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    next_try    REAL NOT NULL DEFAULT 0,
    queued_at   REAL NOT NULL,
    done_at     REAL,
    PRIMARY KEY (target, path, sha256)
);
CREATE INDEX IF NOT EXISTS mirror_queue_run ON mirror_queue (run);
CREATE INDEX IF NOT EXISTS journal_run ON journal (run);
CREATE TABLE IF NOT EXISTS scrubs (
    location    TEXT PRIMARY KEY,         -- "local:<path>" or "<target>:<key>"
    sha256      TEXT,
    scrubbed_at REAL NOT NULL,
    result      TEXT NOT NULL,            -- ok, repaired, quarantined, mismatch, unreadable
    detail      TEXT
);
CREATE TABLE IF NOT EXISTS target_health (
    target        TEXT PRIMARY KEY,       -- a [mirror.NAME]
    failing_since REAL                    -- first failed copy since the last proved one; NULL while copies work
);
CREATE TABLE IF NOT EXISTS runs (
    run         TEXT PRIMARY KEY,
    watch       TEXT NOT NULL,
    latest      TEXT,                     -- newest ok checkpoint, by step then mtime
    best        TEXT,                     -- best ok checkpoint by the watch's metric
    best_metric TEXT,
    best_value  REAL,
    updated_at  REAL NOT NULL,
    rotated_at  REAL                      -- when a checkpoint of the run vanished not by ckptd: its trainer rotates
);
"""

CATALOG_NAME = "catalog.sqlite3"
# A question about one run goes through the index on run: it costs the same at 1,000 checkpoints as at 1,000,000.
# (Constant fragments of SQL, never a value: values are always bound.)
_WATCH_OR_RUN = {False: "watch = ?", True: "+watch = ? AND run = ?"}  # `+`: never the index on watch

_ESCAPE = "\U0010ffff"  # a noncharacter: no sane name holds it, and one that does is escaped too
_SURROGATES = 0xD800
_PRIVATE = 0xF0000  # surrogate U+D800+n is stored as _ESCAPE followed by U+F0000+n (plane 15, private use)


def encode(text: str) -> str:
    """The stored form of `text`: valid UTF-8 text for any str, lone surrogates included (see the module)."""
    if text.isascii():
        return text
    if _ESCAPE not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    out = []
    for char in text:
        code = ord(char)
        if char == _ESCAPE:
            out.append(_ESCAPE + _ESCAPE)
        elif 0xD800 <= code <= 0xDFFF:
            out.append(_ESCAPE + chr(_PRIVATE + code - _SURROGATES))
        else:
            out.append(char)
    return "".join(out)


def decode(stored: str) -> str:
    """The inverse of `encode`."""
    if _ESCAPE not in stored:
        return stored
    out, chars = [], iter(stored)
    for char in chars:
        if char != _ESCAPE:
            out.append(char)
            continue
        following = next(chars, _ESCAPE)
        out.append(_ESCAPE if following == _ESCAPE else chr(_SURROGATES + ord(following) - _PRIVATE))
    return "".join(out)


def _text(data: bytes) -> str:
    return decode(data.decode("utf-8", "surrogateescape"))


def _args(args: Sequence[Any]) -> list[Any]:
    return [encode(a) if isinstance(a, str) else a for a in args]


@dataclass(frozen=True)
class Row:
    """One checkpoint as the catalog knows it."""

    path: str
    watch: str
    run: str
    kind: str
    link_target: str | None
    format: str | None
    status: str | None
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None
    epoch: int | None
    step: int | None
    metrics: dict[str, float]
    problems: list[str]
    first_seen: float
    verified_at: float | None
    gone_at: float | None
    pinned: bool
    device: int = 0
    needs: list[str] = field(default_factory=list)
    resumable: bool | None = None

    @property
    def mtime(self) -> float:
        """Modification time in seconds."""
        return self.mtime_ns / 1e9

    def entry(self) -> Entry:
        """The selection and retention view of this row; unverified until it has a status."""
        return Entry(
            path=self.path, run=self.run, status=self.status, size=self.size, mtime=self.mtime, sha256=self.sha256,
            epoch=self.epoch, step=self.step, metrics=self.metrics, pinned=self.pinned, format=self.format,
            verified=self.status is not None, mtime_ns=self.mtime_ns, inode=self.inode, device=self.device,
            needs=tuple(self.needs), resumable=self.resumable,
        )  # fmt: skip


def _row(values: sqlite3.Row) -> Row:
    data: dict[str, Any] = dict(values)
    data["metrics"] = json.loads(data["metrics"])
    data["problems"] = json.loads(data["problems"])
    data["needs"] = json.loads(data.get("needs") or "[]")
    data["resumable"] = None if data.get("resumable") is None else bool(data["resumable"])
    data["pinned"] = bool(data["pinned"])
    return Row(**data)


class Catalog:
    """A connection to the catalog of one state folder. Use as a context manager, or call close()."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / CATALOG_NAME
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.text_factory = _text
        self._exec("PRAGMA journal_mode=WAL")
        self._exec("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _exec(self, query: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement with its text arguments in their stored form (see `encode`)."""
        return self._db.execute(query, _args(args))

    def _add_missing_columns(self) -> None:
        """Bring a catalog made by an older ckptd up to this schema: new columns only, never a data loss."""
        added = {
            "mirror_queue": {"copied": "INTEGER NOT NULL DEFAULT 0"},
            "runs": {"rotated_at": "REAL"},
            "checkpoints": {
                "device": "INTEGER NOT NULL DEFAULT 0", "needs": "TEXT NOT NULL DEFAULT '[]'", "resumable": "INTEGER",
            },
            "journal": {
                "device": "INTEGER", "inode": "INTEGER", "mtime_ns": "INTEGER",
                "folder": "TEXT", "trash": "TEXT", "trash_folder": "TEXT",
            },
        }  # fmt: skip
        for table, columns in added.items():
            have = {row["name"] for row in self._exec(f"PRAGMA table_info({table})")}
            for column, declaration in columns.items():
                if column not in have:
                    self._exec(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    @classmethod
    def existing(cls, state_dir: Path) -> Catalog | None:
        """The catalog of `state_dir` if there is one; None on a machine that never ran ckptd (nothing created)."""
        return cls(state_dir) if (state_dir / CATALOG_NAME).is_file() else None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def get(self, path: str) -> Row | None:
        """The row of `path`, or None."""
        found = self._exec("SELECT * FROM checkpoints WHERE path = ?", (path,)).fetchone()
        return _row(found) if found else None

    def record_verified(self, *, watch: str, run: str, verification: Verification, mtime_ns: int, now: float) -> None:
        """Insert or update the row of a verified checkpoint (first_seen and pinned are kept)."""
        v = verification
        self._exec(
            """
            INSERT INTO checkpoints (path, watch, run, kind, link_target, format, status, size, mtime_ns, inode,
                sha256, epoch, step, metrics, problems, first_seen, verified_at, gone_at, device, needs, resumable)
            VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)
            ON CONFLICT (path) DO UPDATE SET
                watch = excluded.watch, run = excluded.run, kind = excluded.kind, link_target = NULL,
                format = excluded.format, status = excluded.status, size = excluded.size,
                mtime_ns = excluded.mtime_ns, inode = excluded.inode, device = excluded.device,
                sha256 = excluded.sha256,
                epoch = excluded.epoch, step = excluded.step, metrics = excluded.metrics,
                problems = excluded.problems, verified_at = excluded.verified_at, gone_at = NULL,
                needs = excluded.needs, resumable = excluded.resumable
            """,
            (
                v.path, watch, run, "directory" if v.is_directory else "file", v.format, v.status,
                v.size_bytes, mtime_ns, v.inode, v.sha256, v.epoch, v.global_step,
                json.dumps(v.metrics, allow_nan=True), json.dumps(v.problems), now, now, v.device,
                json.dumps(v.needs), None if v.resumable is None else int(v.resumable),
            ),
        )  # fmt: skip

    def record_link(
        self,
        *,
        watch: str,
        run: str,
        path: str,
        target: str,
        size: int,
        mtime_ns: int,
        inode: int,
        now: float,
    ) -> None:
        """Insert or update a symbolic link that points to another checkpoint; it is never hashed itself."""
        self._exec(
            """
            INSERT INTO checkpoints (path, watch, run, kind, link_target, size, mtime_ns, inode, first_seen,
                verified_at)
            VALUES (?, ?, ?, 'link', ?, ?, ?, ?, ?, ?)
            ON CONFLICT (path) DO UPDATE SET kind = 'link', link_target = excluded.link_target,
                size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode, status = NULL,
                sha256 = NULL, verified_at = excluded.verified_at, gone_at = NULL
            """,
            (path, watch, run, target, size, mtime_ns, inode, now, now),
        )

    def mark_gone(self, path: str, now: float) -> None:
        """Record that `path` no longer exists on disk."""
        self._exec("UPDATE checkpoints SET gone_at = ? WHERE path = ? AND gone_at IS NULL", (now, path))

    def vanished(self, row: Row, now: float, *, deleted: bool) -> bool:
        """Record that the checkpoint of `row` is gone from disk.

        When it was `deleted` from a folder that stays (not moved or removed with its run: see
        discover.vanishing), and not by a deletion of ckptd's, its run's trainer rotates its own checkpoints
        (HF save_total_limit, accelerate total_limit, torchtitan keep_latest_k, Lightning top-k): retention
        then leaves that run to the trainer (see `rotating_runs`). True when that was first learnt now.
        """
        self.mark_gone(row.path, now)
        if row.kind == "link" or not deleted or self.deleted_by_ckptd(row):
            return False
        return (
            self._exec("UPDATE runs SET rotated_at = ? WHERE run = ? AND rotated_at IS NULL", (now, row.run)).rowcount
            > 0
        )

    def rotating_runs(self) -> frozenset[str]:
        """The runs whose trainer was seen deleting its own checkpoints (see `vanished`)."""
        return frozenset(r["run"] for r in self._exec("SELECT run FROM runs WHERE rotated_at IS NOT NULL"))

    def deleted_by_ckptd(self, row: Row) -> bool:
        """True when a deletion of ckptd's names the checkpoint of `row` (under way, or done: a row read just
        before the deletion finished is still present for its reader). The inode tells it from a checkpoint
        written under the same name since."""
        found = self._exec(
            "SELECT 1 FROM journal WHERE path = ? AND state IN ('pending', 'done')"
            " AND COALESCE(NULLIF(inode, 0), ?) = ? LIMIT 1",
            (row.path, row.inode, row.inode),
        ).fetchone()
        return found is not None

    def present(self, *, watch: str | None = None, under: str | None = None) -> Iterator[Row]:
        """Rows of checkpoints still on disk, for one watch and/or below one folder, by path."""
        query, args = "SELECT * FROM checkpoints WHERE gone_at IS NULL", list[Any]()
        if watch is not None:
            query += " AND watch = ?"
            args.append(watch)
        if under is not None:
            query += " AND (path = ? OR substr(path, 1, ?) = ?)"
            prefix = under.rstrip("/") + "/"
            args += [under, len(encode(prefix)), prefix]  # substr counts characters of the stored form
        for found in self._exec(query + " ORDER BY path", args):
            yield _row(found)

    def present_identities(self, *, under: str) -> Iterator[tuple[str, str, bool, int, int, int]]:
        """(path, watch, verified, size, mtime_ns, inode) of every checkpoint and link still on disk below one
        folder, row by row: what a rescan checks its walk against (one query; no row decoded whole)."""
        prefix = under.rstrip("/") + "/"
        rows = self._exec(
            "SELECT path, watch, status IS NOT NULL AND kind != 'link', size, mtime_ns, inode FROM checkpoints"
            " WHERE gone_at IS NULL AND (path = ? OR substr(path, 1, ?) = ?)",
            (under, len(encode(prefix)), prefix),  # substr counts characters of the stored form
        )
        for path, watch, verified, size, mtime_ns, inode in rows:
            yield path, watch, bool(verified), size, mtime_ns, inode

    def present_paths(self, *, under: str) -> list[str]:
        """The paths of checkpoints (and links) still on disk below one folder: what a rescan checks its walk
        against, without building whole rows (100,000 of them at a large site)."""
        prefix = under.rstrip("/") + "/"
        rows = self._exec(
            "SELECT path FROM checkpoints WHERE gone_at IS NULL AND (path = ? OR substr(path, 1, ?) = ?)",
            (under, len(encode(prefix)), prefix),  # substr counts characters of the stored form
        )
        return [row[0] for row in rows]

    def run_names(self, watch: str) -> list[str]:
        """The runs of a watch that have a checkpoint on disk: one query, no row decoded."""
        rows = self._exec("SELECT DISTINCT run FROM checkpoints WHERE watch = ? AND gone_at IS NULL", (watch,))
        return [row[0] for row in rows]

    def set_run(
        self,
        *,
        run: str,
        watch: str,
        latest: str | None,
        best: str | None,
        metric: str | None,
        value: float | None,
        now: float,
    ) -> tuple[str | None, str | None]:
        """Store a run's latest and best; return the (latest, best) stored before."""
        before = self._exec("SELECT latest, best FROM runs WHERE run = ?", (run,)).fetchone()
        self._exec(
            """
            INSERT INTO runs (run, watch, latest, best, best_metric, best_value, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (run) DO UPDATE SET watch = excluded.watch, latest = excluded.latest,
                best = excluded.best, best_metric = excluded.best_metric, best_value = excluded.best_value,
                updated_at = excluded.updated_at
            """,
            (run, watch, latest, best, metric, value, now),
        )
        return (before["latest"], before["best"]) if before else (None, None)

    def runs(self, watch: str | None = None, run: str | None = None) -> list[dict[str, Any]]:
        """Every run's latest and best (or one run's), by run folder: the runs that still have a checkpoint on
        disk."""
        query = (
            "SELECT * FROM runs WHERE EXISTS (SELECT 1 FROM checkpoints c WHERE c.run = runs.run AND c.gone_at IS NULL)"
        )
        args = list[Any]()
        if watch is not None:
            query, args = query + " AND watch = ?", [*args, watch]
        if run is not None:
            query, args = query + " AND run = ?", [*args, run]
        return [dict(r) for r in self._exec(query + " ORDER BY run", args)]

    def counts(self, watch: str, run: str | None = None) -> dict[str, int]:
        """How many present checkpoints of a watch (or of one run of it) are in each status (`pending` before
        verification)."""
        rows = self._exec(
            "SELECT COALESCE(status, CASE kind WHEN 'link' THEN 'link' ELSE 'pending' END) AS s, COUNT(*) AS n"  # noqa: S608
            f" FROM checkpoints WHERE {_WATCH_OR_RUN[run is not None]} AND gone_at IS NULL GROUP BY s",
            (watch,) if run is None else (watch, run),
        )
        return {r["s"]: r["n"] for r in rows}

    def rename(self, old: str, new: str) -> None:
        """Follow a checkpoint's rename in every table (its row keeps its history and its pin)."""
        with self._transaction():
            self._exec("DELETE FROM checkpoints WHERE path = ? AND gone_at IS NOT NULL", (new,))
            self._exec("UPDATE checkpoints SET path = ? WHERE path = ?", (new, old))
            self._exec("UPDATE runs SET latest = ? WHERE latest = ?", (new, old))
            self._exec("UPDATE runs SET best = ? WHERE best = ?", (new, old))
            self._exec("UPDATE OR IGNORE mirror_queue SET path = ? WHERE path = ?", (new, old))

    def set_pinned(self, path: str, pinned: bool) -> bool:
        """Pin or unpin a cataloged checkpoint; False when the catalog does not know it."""
        cursor = self._exec("UPDATE checkpoints SET pinned = ? WHERE path = ? AND gone_at IS NULL", (int(pinned), path))
        return cursor.rowcount > 0

    def link_targets(self) -> dict[str, str]:
        """{target: link} for every link, in any watch, that points to a checkpoint.

        Not per watch: a link in one watch may point to a checkpoint of another, and protects it all the same.
        """
        rows = self._exec("SELECT path, link_target FROM checkpoints WHERE kind = 'link' AND gone_at IS NULL")
        return {r["link_target"]: r["path"] for r in rows}

    def journal_intent(
        self, *, action: str, watch: str, run: str, path: str, sha256: str | None, size: int, reasons: list[str],
        now: float, identity: Identity | None = None, folder: str | None = None, trash: str | None = None,
        trash_folder: str | None = None,
    ) -> int:  # fmt: skip
        """Write down a deletion or quarantine before doing it; return the journal entry's id.

        The entry names the identity that will be removed and the trash name it is moved to first, and it
        is on disk (synchronous=FULL) before this returns: a power cut after the unlink cannot lose it.
        """
        ident = identity or Identity(size, 0, 0, 0)
        self._exec("PRAGMA synchronous=FULL")
        try:
            cursor = self._exec(
                "INSERT INTO journal (planned_at, state, action, watch, run, path, sha256, size, reasons, device,"
                " inode, mtime_ns, folder, trash, trash_folder)"
                " VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now, action, watch, run, path, sha256, size, json.dumps(reasons), ident.device, ident.inode,
                 ident.mtime_ns, folder, trash, trash_folder),
            )  # fmt: skip
        finally:
            self._exec("PRAGMA synchronous=NORMAL")
        return int(cursor.lastrowid or 0)

    def journal_finish(self, entry: int, *, state: str, now: float, detail: str | None = None) -> None:
        """Close a journal entry (done or skipped); a done one also marks its checkpoint gone, atomically."""
        with self._transaction():
            self._exec(
                "UPDATE journal SET state = ?, done_at = ?, detail = COALESCE(?, detail) WHERE id = ?",
                (state, now, detail, entry),
            )
            if state == "done":
                self._exec(  # only the row of the bytes removed: not one of a file written since under that name
                    "UPDATE checkpoints SET gone_at = ? WHERE gone_at IS NULL AND path ="
                    " (SELECT path FROM journal WHERE id = ?) AND inode ="
                    " COALESCE((SELECT NULLIF(inode, 0) FROM journal WHERE id = ?), inode)",
                    (now, entry, entry),
                )

    def journal(
        self, *, state: str | None = None, watch: str | None = None, run: str | None = None
    ) -> list[dict[str, Any]]:
        """Journal entries, oldest first."""
        query, args = "SELECT * FROM journal WHERE 1 = 1", list[Any]()
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        if watch is not None:
            query, args = query + " AND watch = ?", [*args, watch]
        if run is not None:
            query, args = query + " AND run = ?", [*args, run]
        found = []
        for row in self._exec(query + " ORDER BY id", args):
            entry = dict(row)
            entry["reasons"] = json.loads(entry["reasons"])
            found.append(entry)
        return found

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._exec("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._exec("ROLLBACK")
            raise
        self._exec("COMMIT")

    def awaiting_mirror(self, watch: str, run: str | None = None) -> frozenset[str]:
        """Paths of a watch that a mirror rule still has to copy (kept by retention until copied)."""
        # Fix: only pending and failed copies are still to be made. `state != 'done'` also counted dropped
        # rows (superseded before they were copied, or gone), so retention kept those checkpoints forever.
        rows = self._exec(
            f"SELECT DISTINCT path FROM mirror_queue WHERE {_WATCH_OR_RUN[run is not None]}"  # noqa: S608
            " AND state IN ('pending', 'failed')",
            (watch,) if run is None else (watch, run),
        )
        return frozenset(r["path"] for r in rows)

    def sync_mirror_queue(
        self, *, target: str, watch: str, run: str, wanted: dict[str, tuple[list[str], str]], now: float
    ) -> int:
        """Make the queue of one run and target match `wanted` ({path: (roles, sha256)}); return rows queued.

        New copies are queued; a copied one whose roles changed is queued again for its index only; queued
        ones no longer wanted are dropped (so retention may delete them).
        """
        queued = 0
        with self._transaction():
            rows = self._exec(
                "SELECT * FROM mirror_queue WHERE target = ? AND run = ? AND state != 'dropped'", (target, run)
            ).fetchall()
            existing = {(r["path"], r["sha256"]): r for r in rows}
            keep = {(path, sha) for path, (_roles, sha) in wanted.items()}
            for row in rows:
                if (row["path"], row["sha256"]) not in keep and row["state"] in ("pending", "failed"):
                    self._exec(
                        "UPDATE mirror_queue SET state = 'dropped', done_at = ? WHERE target = ? AND path = ?"
                        " AND sha256 = ?",
                        (now, target, row["path"], row["sha256"]),
                    )
            for path, (roles, sha) in wanted.items():
                role = ",".join(sorted(roles))
                row = existing.get((path, sha))
                if row is not None and row["role"] == role:
                    continue
                self._exec(
                    """
                    INSERT INTO mirror_queue (target, path, watch, run, role, sha256, state, queued_at)
                    VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)
                    ON CONFLICT (target, path, sha256) DO UPDATE SET role = excluded.role, state = 'pending',
                        next_try = 0, queued_at = excluded.queued_at
                    """,
                    (target, path, watch, run, role, sha, now),
                )
                queued += 1
        return queued

    def mirror_due(self, now: float | None) -> list[dict[str, Any]]:
        """Queued copies whose retry time has come (all of them when `now` is None), oldest first."""
        query = "SELECT * FROM mirror_queue WHERE state IN ('pending', 'failed')"
        args: list[Any] = []
        if now is not None:
            query, args = query + " AND next_try <= ?", [now]
        return [dict(r) for r in self._exec(query + " ORDER BY queued_at", args)]

    def mirrored_names(self, *, target: str, run: str) -> frozenset[str]:
        """The names of the checkpoints of `run` this machine copied to `target` (proved there at least once):
        the only copies a mirror pass may delete from that run's folder on the target."""
        rows = self._exec("SELECT path FROM mirror_queue WHERE target = ? AND run = ? AND copied = 1", (target, run))
        return frozenset(Path(r["path"]).name for r in rows)

    def mirrored_sha(self, *, target: str, run: str, name: str) -> str | None:
        """The SHA-256 of the copy named `name` this machine last proved on `target` for `run`, or None."""
        rows = self._exec(
            "SELECT path, sha256 FROM mirror_queue WHERE target = ? AND run = ? AND copied = 1"
            " ORDER BY COALESCE(done_at, queued_at) DESC",
            (target, run),
        )
        return next((str(r["sha256"]) for r in rows if Path(r["path"]).name == name), None)

    def mirror_proved(self, *, target: str, run: str | None = None) -> list[dict[str, Any]]:
        """The copies this machine proved on `target` (for one run, or all), each as its mirror_queue row, whatever
        became of it since (a done row is one the target should still hold while it is wanted)."""
        query, args = "SELECT * FROM mirror_queue WHERE target = ? AND copied = 1", [target]
        if run is not None:
            query, args = query + " AND run = ?", [target, run]
        return [dict(r) for r in self._exec(query + " ORDER BY run, path", args)]

    def mirror_requeue(self, item: dict[str, Any], *, now: float, recopy: bool) -> None:
        """Queue a done copy again: the target lost it (`recopy`: copy it again) or only its index entry."""
        self._exec(
            "UPDATE mirror_queue SET state = 'pending', copied = CASE WHEN ? THEN 0 ELSE copied END, attempts = 0,"
            " next_try = 0, last_error = NULL, queued_at = ? WHERE target = ? AND path = ? AND sha256 = ?"
            " AND state = 'done'",
            (int(recopy), now, item["target"], item["path"], item["sha256"]),
        )

    def mirror_finish(self, item: dict[str, Any], *, state: str, now: float, error: str | None = None) -> None:
        """Close a queued copy: done (proved on the target: the target works again) or dropped."""
        self._exec(
            "UPDATE mirror_queue SET state = ?, done_at = ?, last_error = ?, copied = copied OR ?"
            " WHERE target = ? AND path = ? AND sha256 = ?",
            (state, now, error, int(state == "done"), item["target"], item["path"], item["sha256"]),
        )
        if state == "done":
            self._exec("UPDATE target_health SET failing_since = NULL WHERE target = ?", (item["target"],))

    def mirror_retry(self, item: dict[str, Any], *, error: str, next_try: float, now: float) -> None:
        """Record a failed copy; it is tried again at `next_try`."""
        # Fix: a copy dropped while it was being made (its checkpoint superseded or deleted meanwhile) stays
        # dropped; this brought it back as failed, shown in `ckptd status` and kept by retention until retried.
        self._exec(
            "UPDATE mirror_queue SET state = 'failed', attempts = attempts + 1, last_error = ?, next_try = ?"
            " WHERE target = ? AND path = ? AND sha256 = ? AND state != 'dropped'",
            (error, next_try, item["target"], item["path"], item["sha256"]),
        )
        # How long the target has failed, whatever rows came and went meanwhile (a new save re-queues its row).
        self._exec(
            "INSERT INTO target_health (target, failing_since) VALUES (?, ?) ON CONFLICT (target) DO UPDATE"
            " SET failing_since = COALESCE(target_health.failing_since, excluded.failing_since)",
            (item["target"], now),
        )

    def mirror_backlog(self) -> dict[str, dict[str, Any]]:
        """Per target: copies waiting, copies failing, the last error, and since when the target has failed
        (`failing_since`: its first failed copy since the last proved one, a timestamp, or None)."""
        backlog: dict[str, dict[str, Any]] = {}
        for row in self._exec("SELECT target, state, COUNT(*) AS n FROM mirror_queue GROUP BY target, state"):
            backlog.setdefault(
                row["target"], {"pending": 0, "failed": 0, "done": 0, "last_error": None, "failing_since": None}
            )
            if row["state"] in ("pending", "failed", "done"):
                backlog[row["target"]][row["state"]] = row["n"]
        for row in self._exec(
            "SELECT target, last_error FROM mirror_queue WHERE state = 'failed' ORDER BY next_try DESC"
        ):
            found = backlog[row["target"]]
            if found["last_error"] is None:
                found["last_error"] = row["last_error"]
        for row in self._exec("SELECT target, failing_since FROM target_health WHERE failing_since IS NOT NULL"):
            if row["target"] in backlog and backlog[row["target"]]["failed"]:
                backlog[row["target"]]["failing_since"] = row["failing_since"]
        return backlog

    def not_ok(self, watch: str, limit: int = 100, run: str | None = None) -> list[dict[str, Any]]:
        """The checkpoints of a watch (or of one run of it) on disk that are not ok (corrupt, unsafe,
        unsupported), newest first, with their first problem."""
        rows = self._exec(
            "SELECT path, run, status, problems, verified_at FROM checkpoints"  # noqa: S608
            f" WHERE {_WATCH_OR_RUN[run is not None]} AND gone_at IS NULL"
            " AND status NOT IN ('ok', 'pending') ORDER BY COALESCE(verified_at, 0) DESC LIMIT ?",
            (watch, limit) if run is None else (watch, run, limit),
        )
        found = []
        for r in rows:
            problems = json.loads(r["problems"] or "[]")
            found.append({"path": decode(r["path"]), "run": decode(r["run"]), "status": r["status"],
                          "problem": problems[0] if problems else None})  # fmt: skip
        return found

    def quarantined_since(self, since: float) -> list[dict[str, Any]]:
        """Checkpoints moved to quarantine (by retention's on_corrupt or by scrub) after `since`."""
        rows = self._exec(
            "SELECT path, run, done_at, detail, reasons FROM journal WHERE action = 'quarantine' AND state = 'done'"
            " AND done_at > ? ORDER BY done_at",
            (since,),
        )
        return [{"path": decode(r["path"]), "run": decode(r["run"]), "at": r["done_at"], "to": r["detail"],
                 "reasons": json.loads(r["reasons"] or "[]")} for r in rows]  # fmt: skip

    def scrub_order(self, watch: str) -> list[Row]:
        """The ok checkpoints of a watch, least recently scrubbed first (never scrubbed before all others)."""
        rows = self._exec(
            "SELECT c.* FROM checkpoints c LEFT JOIN scrubs s ON s.location = 'local:' || c.path"
            " WHERE c.watch = ? AND c.gone_at IS NULL AND c.status = 'ok' AND c.sha256 IS NOT NULL"
            " ORDER BY COALESCE(s.scrubbed_at, 0), c.path",
            (watch,),
        )
        return [_row(r) for r in rows]

    def last_scrubbed(self, location: str) -> float:
        """When a location was last scrubbed (0 if never)."""
        found = self._exec("SELECT scrubbed_at FROM scrubs WHERE location = ?", (location,)).fetchone()
        return float(found["scrubbed_at"]) if found else 0.0

    def record_scrub(self, location: str, *, sha256: str | None, result: str, now: float, detail: str = "") -> None:
        """Record a scrub's result for one location."""
        self._exec(
            "INSERT INTO scrubs (location, sha256, scrubbed_at, result, detail) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (location) DO UPDATE SET sha256 = excluded.sha256, scrubbed_at = excluded.scrubbed_at,"
            " result = excluded.result, detail = excluded.detail",
            (location, sha256, now, result, detail),
        )

    def scrub_problems(self) -> list[dict[str, Any]]:
        """Locations whose last scrub found rot it could not repair, or that were quarantined or repaired."""
        rows = self._exec("SELECT * FROM scrubs WHERE result != 'ok' ORDER BY scrubbed_at DESC")
        return [dict(r) for r in rows]

    def update_identity(self, path: str, *, mtime_ns: int, inode: int) -> None:
        """Record a checkpoint's new inode after it was replaced by an identical, repaired copy."""
        self._exec("UPDATE checkpoints SET mtime_ns = ?, inode = ? WHERE path = ?", (mtime_ns, inode, path))

    def mark_corrupt(self, path: str, problem: str) -> None:
        """Record that a verified checkpoint turned out corrupt (bit rot found by a scrub)."""
        self._exec(
            "UPDATE checkpoints SET status = 'corrupt', problems = ? WHERE path = ?", (json.dumps([problem]), path)
        )

    def history(self, run: str) -> list[Row]:
        """Rows of every checkpoint a run folder ever had, gone ones included, by path (`ckptd report`)."""
        return [_row(r) for r in self._exec("SELECT * FROM checkpoints WHERE run = ? ORDER BY path", (run,))]

    def mirror_rows(self, run: str) -> list[dict[str, Any]]:
        """Every mirror queue row of a run, done and dropped ones included, by target then age."""
        rows = self._exec("SELECT * FROM mirror_queue WHERE run = ? ORDER BY target, queued_at", (run,))
        return [dict(r) for r in rows]

    def in_run(self, run: str) -> list[Row]:
        """Rows of the checkpoints present in one run folder."""
        rows = self._exec("SELECT * FROM checkpoints WHERE run = ? AND gone_at IS NULL ORDER BY path", (run,))
        return [_row(r) for r in rows]
