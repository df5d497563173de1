"""`ckptd report`: a real Lightning run, cataloged, mirrored and pruned for real, drawn as a page and a PNG."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import checkpoints
import pytest
from cli_fixtures import Ckptd

from ckptd import report
from ckptd.catalog import Catalog
from ckptd.config import load_config
from ckptd.prune import PruneReport, prune_watch

TESTS = Path(__file__).resolve().parent
SVG = "{http://www.w3.org/2000/svg}"
# The only addresses a page may hold: the SVG and XLink namespace names, which are never fetched.
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
EPOCHS = 6  # epoch=0-step=4 ... epoch=5-step=24, and last.ckpt
CORRUPT = 2  # the epoch whose checkpoint gets a flipped bit: quarantined by retention


def _config(root: Path, retention: str, *, mirror: bool = True) -> Path:
    mirrors = (
        '[watch.mirror]\nto = ["backup", "offsite"]\nwhat = ["best", "latest", "milestones"]\n\n'
        '[mirror.backup]\nurl = "backup"\n\n[mirror.offsite]\nurl = "offsite"\n'
    )
    path = root / "config.toml"
    path.write_text(
        '[daemon]\nstate_dir = "state"\n\n[[watch]]\nname = "runs"\npath = "runs"\nsettle_seconds = 0\n\n'
        f'[watch.metric]\nname = "val_loss"\nmode = "min"\n\n[watch.retention]\n{retention}\n'
        + (mirrors if mirror else ""),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Lightning run (tests/lightning_train.py, in its own process): six epochs and last.ckpt."""
    run = tmp_path_factory.mktemp("lightning") / "exp1"
    done = subprocess.run(
        [sys.executable, str(TESTS / "lightning_train.py"), "--dir", str(run), "--epochs", str(EPOCHS)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split()) == EPOCHS + 1
    return run


@dataclass
class Cell:
    """A table row of the page: its class and the text of each cell."""

    css: str
    cells: list[str] = field(default_factory=list)


class _Rows(HTMLParser):
    """The rows of the page's table of checkpoints (`table.checkpoints tbody tr`), as text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Cell] = []
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append(Cell(dict(attrs).get("class") or ""))
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].cells.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table(page: str) -> dict[str, Cell]:
    """{checkpoint name: its row} of a report page (the name cell holds the name, then its tags)."""
    parser = _Rows()
    parser.feed(page)
    return {row.cells[2].split(" ")[0]: row for row in parser.rows}


def svg_of(page: str) -> ET.Element:
    """The page's inline SVG, parsed."""
    found = re.search(r"<svg\b.*?</svg>", page, re.DOTALL)
    assert found is not None
    return ET.fromstring(found.group(0))


class _Tags(HTMLParser):
    """Every tag of a page with its attributes (inline SVG included)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def assert_self_contained(page: str) -> None:
    """Nothing in the page reaches the network, runs, or loads another file: no address but the SVG namespace
    names, no script, no external link, stylesheet, image or font, no event handler, and every url() and
    href within the page."""
    assert set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", page, re.IGNORECASE)) <= NAMESPACES
    assert "@import" not in page and "@font-face" not in page
    assert all(u.startswith("#") for u in re.findall(r"url\(\s*([^)]*)\)", page))
    parser = _Tags()
    parser.feed(page)
    for tag, attrs in parser.tags:
        assert tag not in {"script", "link", "img", "iframe", "object", "embed", "image", "foreignobject"}, tag
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("href", "xlink:href", "src"):
            assert (attrs.get(name) or "#").startswith("#"), (tag, attrs)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking its signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.e2e
def test_report_of_a_real_lightning_run_shows_every_checkpoint_and_what_became_of_it(
    trained: Path, tmp_path: Path, ckptd: Ckptd
) -> None:
    """After a real run is cataloged, mirrored to two targets and pruned (one checkpoint corrupt), the page lists
    every checkpoint with its step and val_loss, the deleted ones with the journal's reason, the quarantined one,
    the rule that keeps each kept one, and the mirrors; its SVG marks each plotted checkpoint with a tooltip, it
    reaches nothing outside itself, and the PNG is a real image."""
    run = tmp_path / "runs" / "exp1"
    shutil.copytree(trained, run)
    corrupt = next(run.glob(f"epoch={CORRUPT}-*.ckpt"))
    checkpoints.flip_tensor_byte(corrupt)
    config_path = _config(tmp_path, 'keep_last = 2\nkeep_best = 1\nkeep_every = 3\non_corrupt = "quarantine"\n')
    assert ckptd("scan", "--config", config_path).code == 1  # the corrupt one fails its check
    assert ckptd("mirror", "--config", config_path).code == 0
    config = load_config(config_path)
    watch = config.watch[0]
    assert watch.retention is not None
    with Catalog(config.daemon.state_dir) as catalog:
        pruned: PruneReport = prune_watch(
            watch, watch.retention, catalog=catalog, state_dir=config.daemon.state_dir, dry_run=False,
            awaiting_mirror=lambda: catalog.awaiting_mirror(watch.name),
        )  # fmt: skip
        rows = {Path(r.path).name: r for r in catalog.present(watch="runs")}
    done = {Path(d.path).name: d for d in pruned.done}
    deleted = {n for n, d in done.items() if d.action == "delete"}
    assert sorted(n.split("-")[0] for n in deleted) == ["epoch=0", "epoch=1"]  # keep_last, keep_best, keep_every
    assert {d.action for d in done.values()} == {"delete", "quarantine"}
    assert corrupt.name in done and not corrupt.exists()
    names = sorted(p.name for p in trained.glob("*.ckpt"))

    out = ckptd("report", run, "--html", "r.html", "--png", "r.png", "--config", config_path)
    assert out.code == 0, out.err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")

    found = table(page)
    assert sorted(found) == names  # every checkpoint, present and gone
    with Catalog(config.daemon.state_dir) as catalog:
        gathered = report.gather(catalog, str(watch.path / "exp1"), watch=watch)
    for point in gathered.points:
        row = found[point.name]
        assert row.cells[0] == str(point.step) and row.cells[1] == str(point.epoch)
        if point.name != corrupt.name:  # a corrupt file's metrics are what its name says, if anything
            assert row.cells[3] == f"{point.metrics['val_loss']:.6g}"
    for name in deleted:
        assert found[name].css == "mark-deleted"
        assert found[name].cells[-3:-1] == ["deleted", "no keep rule applies"]
    assert found[corrupt.name].css == "mark-quarantined" and found[corrupt.name].cells[-3] == "quarantined"
    assert "corrupt, on_corrupt=quarantine" in found[corrupt.name].cells[-2]
    kept = {n for n in names if n not in done}
    assert kept == set(rows) and all(found[n].cells[-3] == "kept" for n in kept)
    milestone = next(n for n in kept if n.startswith("epoch=3-"))
    assert "milestone epoch 3" in found[milestone].cells[-2]
    assert found[milestone].cells[-1] == "backup, offsite"  # milestones are mirrored too
    assert "the trainer's own name" in found["last.ckpt"].cells[-2]
    assert "latest" in found["last.ckpt"].cells[2] and "best" in found["last.ckpt"].cells[2]
    assert found["last.ckpt"].cells[-1] == "backup, offsite"
    assert_self_contained(page)

    svg = svg_of(page)
    marks = {g.get("id", ""): g for g in svg.iter(f"{SVG}g") if g.get("id", "").startswith("ckptd-marks-")}
    tips: list[str] = []
    for group in marks.values():  # a group of one mark holds its tooltip; a scatter's each of its marks
        own = group.find(f"{SVG}title")
        tips += (
            [own.text or ""] if own is not None else [u.findtext(f"{SVG}title") or "" for u in group.iter(f"{SVG}use")]
        )
    # Each checkpoint that holds val_loss is marked on the val_loss chart, with its name and fate as a tooltip.
    plotted = [p for p in gathered.points if "val_loss" in p.metrics]
    assert sorted(t.splitlines()[0] for t in tips) == sorted(p.name for p in plotted)
    for name in deleted:
        assert "deleted: no keep rule applies" in next(t for t in tips if t.startswith(name + "\n"))
    rings = [g for g in svg.iter(f"{SVG}g") if g.get("id", "").startswith("ckptd-mirrored-")]
    assert len(rings) == 2  # one ring per target
    assert any(g.get("id", "").startswith("ckptd-best-") for g in svg.iter(f"{SVG}g"))

    image = (tmp_path / "r.png").read_bytes()
    width, height = png_size(image)
    assert 1000 <= width <= 2000 and 800 <= height <= 3000 and len(image) > 20_000
    from PIL import Image

    with Image.open(tmp_path / "r.png") as opened:
        opened.verify()


def test_report_escapes_hostile_names_and_metrics(tmp_path: Path, ckptd: Ckptd) -> None:
    """Names and metric names come from disk: markup in them is shown as text, never run, and "$" is no mathtext;
    the page still parses as SVG and reaches nothing outside itself."""
    run = tmp_path / "runs" / "<img src=x onerror=alert(1)>"
    hostile = {"val_loss": 0.4, "<script>alert(2)</script>": 1.0, "$\\frac{a}{b}$": 2.0}
    for epoch in (1, 2, 3):
        checkpoints.torch_zip(run / f"epoch={epoch}-<b>&amp;$x$.pt", epoch=epoch, global_step=10 * epoch,
                              metrics={**hostile, "val_loss": 1.0 / epoch}, size_floats=64)  # fmt: skip
    config_path = _config(tmp_path, "keep_last = 1\nkeep_best = 1\n", mirror=False)
    assert ckptd("scan", "--config", config_path).code == 0
    assert ckptd("prune", "--config", config_path).code == 0
    out = ckptd("report", run, "--html", "r.html", "--png", "r.png", "--config", config_path)
    assert out.code == 0, out.err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<img" not in page and "<script" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert sorted(table(page)) == [f"epoch={e}-<b>&amp;$x$.pt" for e in (1, 2, 3)]  # the names, as text
    assert_self_contained(page)
    svg_of(page)
    png_size((tmp_path / "r.png").read_bytes())


def test_report_of_a_run_whose_folder_is_gone(tmp_path: Path, ckptd: Ckptd) -> None:
    """A run folder removed whole (not by ckptd) still has its history: every checkpoint is shown as removed
    outside ckptd, and nothing is on disk."""
    run = tmp_path / "runs" / "exp2"
    for epoch in (1, 2):
        checkpoints.torch_zip(run / f"epoch={epoch}.pt", epoch=epoch, global_step=epoch, size_floats=64)
    config_path = _config(tmp_path, "keep_last = 1\n", mirror=False)
    assert ckptd("scan", "--config", config_path).code == 0
    shutil.rmtree(run)
    assert ckptd("scan", "--config", config_path).code == 0
    out = ckptd("report", run, "--html", "gone.html", "--config", config_path)
    assert out.code == 0, out.err
    rows = table((tmp_path / "gone.html").read_text(encoding="utf-8"))
    assert sorted(rows) == ["epoch=1.pt", "epoch=2.pt"]
    assert all(r.css == "mark-gone" and r.cells[-2] == "removed outside ckptd" for r in rows.values())


def test_report_errors(tmp_path: Path, ckptd: Ckptd, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run the catalog does not know exits 1 (no answer); no output asked for, or a folder outside the watches,
    exits 2 (usage); without matplotlib the message says how to install it, and nothing is written."""
    checkpoints.torch_zip(tmp_path / "runs" / "exp1" / "epoch=1.pt", epoch=1, global_step=1, size_floats=64)
    (tmp_path / "runs" / "never").mkdir()
    config_path = _config(tmp_path, "keep_last = 1\n", mirror=False)
    assert ckptd("scan", "--config", config_path).code == 0
    unknown = ckptd("report", tmp_path / "runs" / "never", "--html", "r.html", "--config", config_path)
    assert unknown.code == 1 and "not in the catalog" in unknown.err
    assert ckptd("report", tmp_path / "runs" / "exp1", "--config", config_path).code == 2
    outside = ckptd("report", tmp_path, "--html", "r.html", "--config", config_path)
    assert outside.code == 2 and "not in a watched folder" in outside.err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    missing = ckptd("report", tmp_path / "runs" / "exp1", "--png", "r.png", "--config", config_path)
    assert missing.code == 2 and "pip install 'ckptd[report]'" in missing.err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.png").exists()


def test_report_module_imports_neither_torch_nor_matplotlib() -> None:
    """The report module and the command line load no torch and no matplotlib until a report is drawn."""
    code = "import sys, ckptd.report, ckptd.cli; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_gather_and_render_are_reproducible(tmp_path: Path, ckptd: Ckptd) -> None:
    """The same catalog at the same `now` draws the same SVG (the report can be diffed and cached)."""
    for epoch in (1, 2):
        checkpoints.torch_zip(tmp_path / "runs" / "a" / f"epoch={epoch}.pt", epoch=epoch, global_step=epoch,
                              size_floats=64)  # fmt: skip
    config_path = _config(tmp_path, "keep_last = 1\n", mirror=False)
    assert ckptd("scan", "--config", config_path).code == 0
    config = load_config(config_path)
    now = time.time()
    with Catalog(config.daemon.state_dir) as catalog:
        first = report.gather(catalog, str(config.watch[0].path / "a"), watch=config.watch[0], now=now)
        second = report.gather(catalog, str(config.watch[0].path / "a"), watch=config.watch[0], now=now)
    assert first == second
    assert report.render_svg(first) == report.render_svg(second)
    assert [p.fate for p in first.points] == ["to delete", "kept"]  # what the next pass would do


def test_every_metric_is_in_the_table_however_many(tmp_path: Path) -> None:
    """A run logging many metrics gets a panel for its own and three others, a column for each of the first
    eight, and every other one as name=value in one cell: none is dropped."""
    metrics = {f"m{i:02d}": float(i) for i in range(12)} | {"val_loss": 0.5}
    points = tuple(
        report.Point(path=f"/r/epoch={e}.pt", name=f"epoch={e}.pt", kind="file", status="ok", step=e, epoch=e,
                     metrics=metrics, size=1000, written=1e9 + e, gone_at=None, fate="kept", reasons=("keep_last",))
        for e in (1, 2)
    )  # fmt: skip
    drawn = report.RunReport(run="/r", watch="w", metric="val_loss", mode="min", points=points, generated_at=1e9 + 9)
    assert drawn.charted == ["val_loss", "m00", "m01", "m02"]
    page = report.render_html(drawn)
    header = re.findall(r"<th>([^<]*)</th>", page.split('<table class="checkpoints">')[1])
    assert header[3:12] == ["val_loss", "m00", "m01", "m02", "m03", "m04", "m05", "m06", "other metrics"]
    row = next(iter(table(page).values()))
    assert row.cells[11] == ", ".join(f"m{i:02d}={i}" for i in range(7, 12))
    assert "(9 more metric(s) are in the table only)" in page
