"""The SQLite catalog, on a real database file in tmp_path."""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.catalog import CATALOG_NAME, Catalog, Row, decode, encode
from ckptd.model import Identity, Verification

MTIME_NS = 1_700_000_000_123_456_789


def _verification(path: str, **changes: Any) -> Verification:
    """A verification record of `path`, with fields overridden by `changes`."""
    fields: dict[str, Any] = {
        "path": path, "status": "ok", "format": "torch_zip", "size_bytes": 1000, "sha256": "a" * 64,
        "mtime": MTIME_NS / 1e9, "inode": 42, "epoch": 1, "global_step": 100, "metrics": {"val_loss": 0.5},
    }  # fmt: skip
    return Verification(**(fields | changes))


def _record(catalog: Catalog, path: str, *, now: float = 100.0, watch: str = "w", **changes: Any) -> None:
    """record_verified with the usual identity (size 1000, MTIME_NS, inode 42) unless changed."""
    mtime_ns = changes.pop("mtime_ns", MTIME_NS)
    v = _verification(path, **changes)
    catalog.record_verified(watch=watch, run=str(Path(path).parent), verification=v, mtime_ns=mtime_ns, now=now)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    """A catalog in a fresh state folder."""
    with Catalog(tmp_path / "state") as opened:
        yield opened


def test_catalog_creates_its_state_folder_and_uses_wal(tmp_path: Path) -> None:
    """Opening creates the state folder and a database in WAL mode, as another connection sees it."""
    with Catalog(tmp_path / "deep" / "state") as catalog:
        assert catalog.path == tmp_path / "deep" / "state" / CATALOG_NAME
        _record(catalog, "/r/a.pt")
    other = sqlite3.connect(tmp_path / "deep" / "state" / CATALOG_NAME)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_a_reader_sees_committed_rows_while_the_catalog_is_open(tmp_path: Path) -> None:
    """Rows are committed at once: a second connection reads them while the first stays open."""
    with Catalog(tmp_path) as catalog:
        _record(catalog, "/r/a.pt")
        reader = sqlite3.connect(tmp_path / CATALOG_NAME)
        try:
            assert reader.execute("SELECT path, status FROM checkpoints").fetchall() == [("/r/a.pt", "ok")]
        finally:
            reader.close()


def unchanged(catalog: Catalog, path: str, size: int, mtime_ns: int, inode: int) -> bool:
    """What a rescan asks of the catalog (scan.survey): is `path` verified with exactly this identity?"""
    rows = catalog.present_identities(under="/")
    found = {p: (s, m, i) for p, watch, verified, s, m, i in rows if verified and watch == "w"}
    return found.get(path) == (size, mtime_ns, inode)


def test_unchanged_is_true_only_for_identical_size_mtime_and_inode(catalog: Catalog) -> None:
    """present_identities() holds the exact recorded size, mtime_ns and inode, and nothing else."""
    _record(catalog, "/r/a.pt")
    assert unchanged(catalog, "/r/a.pt", 1000, MTIME_NS, 42)
    assert not unchanged(catalog, "/r/a.pt", 1001, MTIME_NS, 42)
    assert not unchanged(catalog, "/r/a.pt", 1000, MTIME_NS + 1, 42)
    assert not unchanged(catalog, "/r/a.pt", 1000, MTIME_NS, 43)
    assert not unchanged(catalog, "/r/b.pt", 1000, MTIME_NS, 42)


def test_record_verified_stores_the_record(catalog: Catalog) -> None:
    """A verified row keeps kind, format, status, identity, hash, epoch, step, metrics and problems."""
    _record(catalog, "/r/a.pt", status="corrupt", problems=["a.pt: truncated"], metrics={"l": 0.25, "n": math.inf})
    _record(catalog, "/r/dcp", format="dcp", files={".metadata": "b" * 64})
    row = catalog.get("/r/a.pt")
    assert row is not None
    assert (row.kind, row.format, row.status, row.size, row.mtime_ns, row.inode) == (
        "file", "torch_zip", "corrupt", 1000, MTIME_NS, 42
    )  # fmt: skip
    assert (row.sha256, row.epoch, row.step, row.problems) == ("a" * 64, 1, 100, ["a.pt: truncated"])
    assert row.metrics == {"l": 0.25, "n": math.inf}
    assert row.mtime == MTIME_NS / 1e9
    assert (row.watch, row.run, row.link_target, row.gone_at, row.pinned) == ("w", "/r", None, None, False)
    directory = catalog.get("/r/dcp")
    assert directory is not None and directory.kind == "directory"
    assert catalog.get("/r/none.pt") is None


def test_first_seen_is_kept_when_a_checkpoint_is_verified_again(catalog: Catalog) -> None:
    """Re-verifying updates the row and verified_at but keeps first_seen."""
    _record(catalog, "/r/a.pt", now=100.0)
    _record(catalog, "/r/a.pt", now=250.0, size_bytes=2000, sha256="c" * 64, status="corrupt", mtime_ns=MTIME_NS + 7)
    row = catalog.get("/r/a.pt")
    assert row is not None
    assert (row.first_seen, row.verified_at) == (100.0, 250.0)
    assert (row.size, row.sha256, row.status, row.mtime_ns) == (2000, "c" * 64, "corrupt", MTIME_NS + 7)
    assert unchanged(catalog, "/r/a.pt", 2000, MTIME_NS + 7, 42)
    assert not unchanged(catalog, "/r/a.pt", 1000, MTIME_NS, 42)


def test_mark_gone_hides_the_row_from_present_but_keeps_its_history(catalog: Catalog) -> None:
    """A checkpoint marked gone leaves present(), in_run() and present_identities(); get() still has it."""
    _record(catalog, "/r/a.pt")
    _record(catalog, "/r/b.pt")
    catalog.mark_gone("/r/a.pt", 300.0)
    assert [r.path for r in catalog.present()] == ["/r/b.pt"]
    assert [r.path for r in catalog.in_run("/r")] == ["/r/b.pt"]
    assert not unchanged(catalog, "/r/a.pt", 1000, MTIME_NS, 42)
    row = catalog.get("/r/a.pt")
    assert row is not None and row.gone_at == 300.0
    catalog.mark_gone("/r/a.pt", 400.0)  # already gone: the first time is kept
    again = catalog.get("/r/a.pt")
    assert again is not None and again.gone_at == 300.0


def test_a_gone_checkpoint_that_reappears_is_present_again(catalog: Catalog) -> None:
    """Verifying a path marked gone clears gone_at and keeps its first_seen."""
    _record(catalog, "/r/a.pt", now=100.0)
    catalog.mark_gone("/r/a.pt", 200.0)
    _record(catalog, "/r/a.pt", now=300.0)
    row = catalog.get("/r/a.pt")
    assert row is not None and (row.gone_at, row.first_seen) == (None, 100.0)
    assert [r.path for r in catalog.present()] == ["/r/a.pt"]


def test_present_filters_by_watch_and_by_folder(catalog: Catalog) -> None:
    """present(under=F) holds F and what lies below it, not siblings sharing a name prefix; watch= filters."""
    _record(catalog, "/data/run", watch="a", format="dcp", files={})
    _record(catalog, "/data/run/x.pt", watch="a")
    _record(catalog, "/data/run/sub/y.pt", watch="b")
    _record(catalog, "/data/run2/z.pt", watch="a")
    assert [r.path for r in catalog.present(under="/data/run")] == ["/data/run", "/data/run/sub/y.pt",
                                                                    "/data/run/x.pt"]  # fmt: skip
    assert [r.path for r in catalog.present(watch="a")] == ["/data/run", "/data/run/x.pt", "/data/run2/z.pt"]
    assert [r.path for r in catalog.present(watch="b", under="/data")] == ["/data/run/sub/y.pt"]


def test_record_link_stores_a_pointer_that_is_never_unchanged(catalog: Catalog) -> None:
    """A link row has kind 'link', its target and no status, so it never counts as verified."""
    catalog.record_link(
        watch="w", run="/r", path="/r/last.pt", target="/r/a.pt", size=7, mtime_ns=MTIME_NS, inode=9, now=50.0
    )
    row = catalog.get("/r/last.pt")
    assert row is not None
    assert (row.kind, row.link_target, row.status, row.sha256) == ("link", "/r/a.pt", None, None)
    assert (row.size, row.mtime_ns, row.inode, row.first_seen) == (7, MTIME_NS, 9, 50.0)
    assert not unchanged(catalog, "/r/last.pt", 7, MTIME_NS, 9)
    assert [r.path for r in catalog.present()] == ["/r/last.pt"]

    catalog.record_link(
        watch="w", run="/r", path="/r/last.pt", target="/r/b.pt", size=7, mtime_ns=MTIME_NS + 1, inode=9, now=60.0
    )
    moved = catalog.get("/r/last.pt")
    assert moved is not None and (moved.link_target, moved.first_seen, moved.verified_at) == ("/r/b.pt", 50.0, 60.0)


def test_a_file_replaced_by_a_link_loses_its_verdict(catalog: Catalog) -> None:
    """When a verified file's path becomes a link, the row turns into a link without status or hash."""
    _record(catalog, "/r/last.pt")
    catalog.record_link(
        watch="w", run="/r", path="/r/last.pt", target="/r/a.pt", size=7, mtime_ns=MTIME_NS, inode=9, now=50.0
    )
    row = catalog.get("/r/last.pt")
    assert row is not None and (row.kind, row.status, row.sha256, row.link_target) == ("link", None, None, "/r/a.pt")


def test_rows_survive_reopening(tmp_path: Path) -> None:
    """What one Catalog recorded, the next one opened on the same folder finds."""
    with Catalog(tmp_path) as first:
        _record(first, "/r/a.pt", now=100.0)
    with Catalog(tmp_path) as second:
        assert unchanged(second, "/r/a.pt", 1000, MTIME_NS, 42)
        row = second.get("/r/a.pt")
        assert row is not None and row.first_seen == 100.0


# ------------------------------------------------------------------------------------------- any file name

_part = st.text(min_size=1, max_size=12) | st.sampled_from(["\udcff", "\udc80x", "\U0010ffff", "é"])
any_path = st.lists(_part, min_size=1, max_size=4).map(lambda ps: "/r/" + "/".join(p.replace("/", "_") for p in ps))


@given(any_path)
def test_encode_is_one_to_one_and_keeps_prefixes(path: str) -> None:
    """Every str, lone surrogates and U+10FFFF included, stores as valid UTF-8 and reads back the same; a prefix
    of a path stays a prefix of its stored form (the catalog's `under=` queries rely on it)."""
    stored = encode(path)
    stored.encode("utf-8")
    assert decode(stored) == path
    assert stored.startswith(encode(path[: len(path) // 2]))
    if path.isascii() or ("\U0010ffff" not in path and not any("\ud800" <= c <= "\udfff" for c in path)):
        assert stored == path, "plain names are stored as they are"


def test_a_name_that_is_not_utf8_is_recorded_and_found(catalog: Catalog) -> None:
    """A checkpoint whose name holds bytes that are not UTF-8 is recorded, read back and found under its run."""
    weird = "/r/" + os.fsdecode(b"epoch-\xff\xfe.pt")
    _record(catalog, weird)
    _record(catalog, "/r/" + "x" * 255)
    row = catalog.get(weird)
    assert row is not None and row.path == weird and row.run == "/r"
    assert {r.path for r in catalog.present(under="/r")} == {weird, "/r/" + "x" * 255}
    catalog.mark_gone(weird, 200.0)
    assert catalog.get(weird).gone_at == 200.0  # type: ignore[union-attr]


def test_a_checkpoint_deleted_not_by_ckptd_marks_its_run_as_rotated_by_its_trainer(catalog: Catalog) -> None:
    """A checkpoint deleted from a folder that stays, by something other than ckptd, tells that the run's trainer
    rotates its own checkpoints (learnt once). Moved away with its folder, deleted by ckptd (pending or just done,
    same inode), or a link: no such thing. A run known to rotate keeps that flag."""
    for name in ("a", "b", "c", "d", "e"):
        _record(catalog, f"/runs/{name}/1.pt")
        _record(catalog, f"/runs/{name}/2.pt", inode=43)
        catalog.set_run(run=f"/runs/{name}", watch="w", latest=None, best=None, metric=None, value=None, now=1.0)

    def row(path: str) -> Row:
        found = catalog.get(path)
        assert found is not None
        return found

    assert catalog.vanished(row("/runs/a/1.pt"), 2.0, deleted=False) is False  # its run folder moved away

    def intent(run: str) -> int:
        same = Identity(1000, MTIME_NS, 42, 0)
        return catalog.journal_intent(action="delete", watch="w", run=run, path=f"{run}/1.pt", sha256=None,
                                      size=1000, reasons=[], now=2.0, identity=same)  # fmt: skip

    entry = intent("/runs/b")
    assert catalog.vanished(row("/runs/b/1.pt"), 2.0, deleted=True) is False  # ckptd's own, under way
    catalog.journal_finish(entry, state="done", now=3.0)
    entry = intent("/runs/c")
    before = row("/runs/c/1.pt")
    catalog.journal_finish(entry, state="done", now=3.0)
    assert catalog.vanished(before, 3.0, deleted=True) is False  # read just before done
    catalog.record_link(watch="w", run="/runs/d", path="/runs/d/last.pt", target="/runs/d/1.pt", size=1,
                        mtime_ns=1, inode=7, now=1.0)  # fmt: skip
    assert catalog.vanished(row("/runs/d/last.pt"), 2.0, deleted=True) is False  # a link is no checkpoint
    assert catalog.rotating_runs() == frozenset()
    assert catalog.vanished(row("/runs/e/1.pt"), 2.0, deleted=True) is True  # the trainer's rotation
    assert catalog.vanished(row("/runs/e/2.pt"), 2.0, deleted=True) is False  # known already
    assert catalog.rotating_runs() == frozenset({"/runs/e"})
    assert [r.path for r in catalog.present(under="/runs/e")] == []


def test_a_run_whose_checkpoints_are_all_gone_leaves_the_list_of_runs(catalog: Catalog) -> None:
    """`status` lists the runs that still have a checkpoint on disk; a run folder deleted whole disappears."""
    for run in ("/runs/kept", "/runs/removed"):
        _record(catalog, f"{run}/1.pt")
        catalog.set_run(run=run, watch="w", latest=f"{run}/1.pt", best=None, metric=None, value=None, now=1.0)
    catalog.mark_gone("/runs/removed/1.pt", 2.0)
    assert [r["run"] for r in catalog.runs("w")] == ["/runs/kept"]
