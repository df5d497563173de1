"""`ckptd scrub` and `[daemon] scrub_interval`: bit rot found on disk and on mirror targets, and what follows.

Real checkpoints are verified (`ckptd scan`) and mirrored (`ckptd mirror`) to a local folder or to S3 (moto's
standalone server on loopback). Bit rot is one flipped byte written with os.pwrite, the mtime then put back
with os.utime, so the catalog's identity (size, mtime_ns, inode) still matches and only the bytes differ. On
S3 the object is overwritten with the flipped bytes through boto3. Commands run in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import checkpoints
import pytest
from cli_fixtures import Ckptd, Done

from ckptd import scrub as scrubbing
from ckptd import sidecar, throttle
from ckptd.catalog import Catalog
from ckptd.config import default_node, load_config
from ckptd.daemon import Daemon
from ckptd.discover import identity
from ckptd.migrate import apply_rename
from ckptd.mirror import targets_of
from ckptd.scrub import hash_throttled
from ckptd.throttle import Throttle
from ckptd.verify import verify

NODE = default_node()  # this box's namespace on every target ([daemon] node left out)

if TYPE_CHECKING:
    from mirror_fixtures import Bucket


T0 = 1_700_000_000


class Site:
    """runs/exp: three real verified torch checkpoints (epochs 1-3) and a config; optionally a mirror target."""

    def __init__(self, root: Path, ckptd: Ckptd, mirror: str | None = None, bucket: Bucket | None = None,
                 daemon: str = "") -> None:  # fmt: skip
        self.root, self.ckptd, self.bucket = root, ckptd, bucket
        self.run = root / "runs" / "exp"
        self.paths = []
        for epoch in (1, 2, 3):
            path = checkpoints.torch_zip(self.run / f"epoch-{epoch:02d}_step-{epoch * 100:06d}.pt", epoch=epoch,
                                         global_step=epoch * 100, size_floats=8192)  # fmt: skip
            os.utime(path, ns=((T0 + epoch) * 10**9, (T0 + epoch) * 10**9))
            self.paths.append(path)
        text = f'[daemon]\nstate_dir = "state"\n{daemon}\n[[watch]]\nname = "w"\npath = "runs"\n'
        self.mirror = mirror
        if mirror == "local":
            text += '\n[watch.mirror]\nto = ["backup"]\nwhat = ["all"]\n\n[mirror.backup]\nurl = "backup"\n'
        elif mirror == "s3":
            assert bucket is not None
            text += (
                '\n[watch.mirror]\nto = ["s3"]\nwhat = ["all"]\n\n[mirror.s3]\n'
                f'url = "s3://{bucket.name}/mirror"\nendpoint_url = "{bucket.endpoint}"\nregion = "us-east-1"\n'
            )
        self.config = root / "config.toml"
        self.config.write_text(text)
        done = ckptd("scan", "--config", self.config)
        assert done.code == 0, done.err
        if mirror:
            done = ckptd("mirror", "--config", self.config)
            assert done.code == 0, done.err
            assert "failed:" not in done.out + done.err and done.out.count("copied: ") >= len(self.paths)

    @property
    def target_name(self) -> str:
        return "backup" if self.mirror == "local" else "s3"

    def copy_location(self, path: Path) -> str:
        """The scrub location of a checkpoint's copy on the target."""
        return f"{self.target_name}:w/exp/{path.name}"

    def copy_bytes(self, path: Path) -> bytes:
        """The bytes of a checkpoint's copy on the target."""
        if self.mirror == "local":
            return (self.root / "backup" / NODE / "w" / "exp" / path.name).read_bytes()
        assert self.bucket is not None
        found = self.bucket.server.client().get_object(Bucket=self.bucket.name, Key=f"mirror/{NODE}/w/exp/{path.name}")
        return bytes(found["Body"].read())

    def rot_copy(self, path: Path) -> None:
        """Flip one byte of a checkpoint's copy on the target (S3: overwrite the object with the bad bytes)."""
        if self.mirror == "local":
            rot(self.root / "backup" / NODE / "w" / "exp" / path.name)
            return
        assert self.bucket is not None
        bad = bytearray(self.copy_bytes(path))
        bad[len(bad) // 2] ^= 0x01
        self.bucket.server.client().put_object(Bucket=self.bucket.name, Key=f"mirror/{NODE}/w/exp/{path.name}",
                                               Body=bytes(bad))  # fmt: skip

    def scrub(self) -> tuple[Done, dict[str, Any]]:
        """`ckptd scrub --json`: the finished command and its report."""
        done = self.ckptd("scrub", "--config", self.config, "--json")
        return done, json.loads(done.out)

    def status(self) -> dict[str, Any]:
        """`ckptd status --json`."""
        done = self.ckptd("status", "--config", self.config, "--json")
        assert done.code == 0, done.err
        result: dict[str, Any] = json.loads(done.out)
        return result


def rot(path: Path) -> None:
    """Flip one byte in the middle of a file in place and restore its mtime: only the bytes change."""
    st = path.stat()
    offset = st.st_size // 2
    fd = os.open(path, os.O_RDWR)
    try:
        (value,) = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([value ^ 0x01]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = identity(path)
    assert (after.size, after.mtime_ns, after.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


def sha(path: Path) -> str:
    """SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_sha(path: Path) -> str:
    """The SHA-256 the checkpoint's sidecar records."""
    found = sidecar.read(path)
    assert found is not None and found.verification.sha256
    return found.verification.sha256


@pytest.fixture
def local_site(tmp_path: Path, ckptd: Ckptd) -> Site:
    """runs/exp verified and mirrored to the local folder `backup`."""
    return Site(tmp_path, ckptd, mirror="local")


@pytest.fixture(params=["local", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path, ckptd: Ckptd) -> Site:
    """runs/exp verified and mirrored to a local folder, then to S3."""
    if request.param == "local":
        return Site(tmp_path, ckptd, mirror="local")
    bucket: Bucket = request.getfixturevalue("s3_bucket")
    return Site(tmp_path, ckptd, mirror="s3", bucket=bucket)


# -------------------------------------------------------------------------------------------- throttle


class FakeClock:
    """monotonic() and sleep() of a clock that only moves when told to, or when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_throttle_keeps_the_average_rate_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 1000 B/s, 4000 bytes take 4 s of sleep; idle time earns no burst; rate 0 never sleeps."""
    clock = FakeClock()
    monkeypatch.setattr(throttle, "time", clock)
    limit = Throttle(1000)
    for nbytes in (500, 500, 1000, 2000):
        limit(nbytes)
    assert clock.slept == pytest.approx([0.5, 0.5, 1.0, 2.0])
    assert clock.now - 1000.0 == pytest.approx(4.0)
    clock.now += 60  # a minute idle: the next read still waits for its own bytes
    limit(250)
    assert clock.slept[-1] == pytest.approx(0.25)
    clock.slept.clear()
    free = Throttle(0)
    for _ in range(100):
        free(10**9)
    assert clock.slept == []


def test_hash_throttled_charges_every_byte_and_matches_the_sidecar(tmp_path: Path) -> None:
    """hash_throttled gives the verified SHA-256 of a file and of a DCP folder, charging every byte it reads."""
    charged: list[int] = []

    class Counting(Throttle):
        def __call__(self, nbytes: int) -> None:
            charged.append(nbytes)

    zipped = checkpoints.torch_zip(tmp_path / "a.pt")
    dcp = checkpoints.dcp_checkpoint(tmp_path / "dcp")
    assert hash_throttled(zipped, Counting(0), tmp_path) == sha(zipped) == verify(zipped).sha256
    assert sum(charged) == zipped.stat().st_size
    charged.clear()
    assert hash_throttled(dcp, Counting(0), tmp_path) == verify(dcp).sha256
    assert sum(charged) == sum(p.stat().st_size for p in dcp.iterdir())


def test_scrub_reads_local_files_and_mirror_copies_through_scrub_bandwidth(
    tmp_path: Path, ckptd: Ckptd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte a scrub reads, locally and on the target, is charged to one throttle at scrub_bandwidth."""
    site = Site(tmp_path, ckptd, mirror="local", daemon='scrub_bandwidth = "123MB/s"')
    made: list[Throttle] = []
    charged: list[int] = []

    class Counting(Throttle):
        def __init__(self, rate: float) -> None:
            super().__init__(rate)
            made.append(self)

        def __call__(self, nbytes: int) -> None:
            charged.append(nbytes)

    monkeypatch.setattr(scrubbing, "Throttle", Counting)
    done, report = site.scrub()
    assert done.code == 0, done.err
    assert (report["checked"], report["ok"]) == (6, 6)
    assert [t.rate for t in made] == [123_000_000]
    assert sum(charged) == 2 * sum(p.stat().st_size for p in site.paths)  # each file, then its copy


def test_scrub_rate_is_limited_in_real_time(tmp_path: Path, ckptd: Ckptd) -> None:
    """At scrub_bandwidth 400KB/s a scrub takes at least its bytes / 400 KB/s (and, generously, under 30 s)."""
    site = Site(tmp_path, ckptd, daemon='scrub_bandwidth = "400KB/s"')
    total = sum(p.stat().st_size for p in site.paths)
    started = time.monotonic()
    done, report = site.scrub()
    elapsed = time.monotonic() - started
    assert done.code == 0 and report["ok"] == 3
    assert total / 400_000 <= elapsed < 30


# ------------------------------------------------------------------------------------------ rot found


def test_a_clean_scrub_checks_every_checkpoint_and_copy(tmp_path: Path, ckptd: Ckptd) -> None:
    """With no rot, every local checkpoint (a DCP folder too) and every copy is ok; status shows no problem."""
    checkpoints.dcp_checkpoint(tmp_path / "runs" / "exp" / "dcp-step-7")
    site = Site(tmp_path, ckptd, mirror="local")
    done, report = site.scrub()
    assert done.code == 0, done.err
    assert (report["checked"], report["ok"]) == (8, 8)
    assert report["repaired"] == report["quarantined"] == report["mismatched"] == report["skipped"] == []
    assert site.status()["scrub_problems"] == []
    assert "scrubbed 8: 8 ok, 0 repaired, 0 quarantined" in ckptd("scrub", "--config", site.config).out


def test_local_rot_is_repaired_from_the_mirror_copy(site: Site, ckptd: Ckptd) -> None:
    """A flipped byte on disk is found, logged as an error, and repaired from the target's proved copy."""
    path = site.paths[1]
    expected, before = recorded_sha(path), path.stat()
    rot(path)
    assert sha(path) != expected

    done, report = site.scrub()
    assert done.code == 0, done.err
    assert report["repaired"] == [str(path)] and report["quarantined"] == report["mismatched"] == []
    assert "checkpoint rotted on disk" in done.err
    assert sha(path) == expected
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert verify(path).status == "ok"
    (problem,) = site.status()["scrub_problems"]
    assert (problem["location"], problem["result"]) == (f"local:{path}", "repaired")
    assert problem["detail"] == f"from {site.target_name}"

    rescan = ckptd("scan", "--config", site.config, "--json")
    summary = json.loads(rescan.out)[str(site.root / "runs")]
    assert (summary["verified"], summary["unchanged"]) == ({}, 3)  # the catalog follows the repaired file
    again, report = site.scrub()
    assert again.code == 0 and report["ok"] == report["checked"] == 6
    assert site.status()["scrub_problems"] == []


def test_local_rot_without_a_good_copy_is_quarantined_and_shown_in_status(
    tmp_path: Path, ckptd: Ckptd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no mirror copy the rotted checkpoint is quarantined with its sidecar; status shows it; exit 1."""
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps `ckptd status` at the terminal's width
    site = Site(tmp_path, ckptd)
    path = site.paths[1]
    expected = recorded_sha(path)
    rot(path)
    rotted = sha(path)

    done, report = site.scrub()
    assert done.code == 1
    assert report["quarantined"] == [str(path)] and report["repaired"] == []
    assert "checkpoint rotted on disk" in done.err
    moved = tmp_path / "state" / "quarantine" / "w" / "exp" / path.name
    assert not path.exists() and not sidecar.sidecar_path(path).exists()
    assert sha(moved) == rotted and sidecar.sidecar_path(moved).is_file()
    note = json.loads(moved.with_name(moved.name + ".quarantine.json").read_text())
    assert note["original_path"] == str(path) and note["sha256"] == expected
    assert "bit rot" in note["reasons"][0]

    status = site.status()
    (problem,) = status["scrub_problems"]
    assert (problem["location"], problem["result"], problem["detail"]) == (f"local:{path}", "quarantined", str(moved))
    assert status["watches"]["w"]["checkpoints"] == {"ok": 2}
    text = ckptd("status", "--config", site.config).out
    assert f"scrub local:{path}: quarantined {moved}" in text
    (listed,) = status["quarantined"]  # until acknowledged: `status --check` fails on it
    assert (listed["path"], listed["to"]) == (str(path), str(moved))
    assert any(line.startswith(f"quarantined {path}") for line in status["attention"])
    ckptd("status", "--config", site.config, "--ack")
    after = site.status()
    assert after["quarantined"] == [] and not any("quarantined" in line for line in after["attention"])
    with Catalog(tmp_path / "state") as catalog:
        row = catalog.get(str(path))
        assert row is not None and row.gone_at is not None and row.status == "corrupt"


def test_mirror_copy_rot_is_repaired_from_the_local_checkpoint(site: Site) -> None:
    """A flipped byte in a copy on the target is found and the copy is put back from the local checkpoint."""
    path = site.paths[0]
    expected, local_before = recorded_sha(path), identity(path)
    site.rot_copy(path)
    assert hashlib.sha256(site.copy_bytes(path)).hexdigest() != expected

    done, report = site.scrub()
    assert done.code == 0, done.err
    assert report["repaired"] == [site.copy_location(path)] and report["mismatched"] == []
    assert "mirror copy rotted" in done.err
    assert hashlib.sha256(site.copy_bytes(path)).hexdigest() == expected
    assert identity(path) == local_before and sha(path) == expected
    (problem,) = site.status()["scrub_problems"]
    assert (problem["location"], problem["result"], problem["detail"]) == (
        site.copy_location(path), "repaired", str(path)
    )  # fmt: skip


def test_rot_on_both_sides_is_never_spread(tmp_path: Path, ckptd: Ckptd, s3_bucket: Bucket) -> None:
    """Rot on disk and on S3: no bad copy replaces the other; local quarantined, S3 copy reported bad; exit 1."""
    site = Site(tmp_path, ckptd, mirror="s3", bucket=s3_bucket)
    path = site.paths[2]
    rot(path)
    site.rot_copy(path)
    bad_copy = site.copy_bytes(path)

    done, report = site.scrub()
    assert done.code == 1
    assert report["quarantined"] == [str(path)] and report["repaired"] == []
    assert report["mismatched"] == [site.copy_location(path)]
    assert site.copy_bytes(path) == bad_copy
    results = {p["location"]: p["result"] for p in site.status()["scrub_problems"]}
    assert results == {f"local:{path}": "quarantined", site.copy_location(path): "mismatch"}


def test_a_copy_is_never_reported_repaired_from_a_checkpoint_renamed_since(local_site: Site) -> None:
    """A copy whose local checkpoint was renamed (ckptd migrate) stays bad: reported bad, never "repaired"."""
    site = local_site
    path = site.paths[0]
    with Catalog(site.root / "state") as catalog:
        apply_rename(path, path.with_name("renamed.pt"), catalog)
    site.rot_copy(path)
    bad_copy = site.copy_bytes(path)

    done, report = site.scrub()
    assert done.code == 1
    assert report["repaired"] == [] and report["mismatched"] == [site.copy_location(path)]
    assert site.copy_bytes(path) == bad_copy
    assert not (site.root / "backup" / NODE / "w" / "exp" / "renamed.pt").exists()


def test_a_garbage_sidecar_on_the_target_is_repaired_and_a_deleted_checkpoint_ignored(
    local_site: Site, ckptd: Ckptd
) -> None:
    """A copy whose sidecar on the target is garbage is bad, and repaired from the local checkpoint this machine's
    catalog knows it came from; a checkpoint deleted locally is no rot."""
    site = local_site
    garbage = site.root / "backup" / NODE / "w" / "exp" / f"{site.paths[0].name}{sidecar.SIDECAR_SUFFIX}"
    garbage.write_text("{not json")
    site.paths[2].unlink()
    done = ckptd("scrub", "--config", site.config)
    assert done.code == 0, done.err
    assert "scrubbed 5: 4 ok, 1 repaired, 0 quarantined, 0 bad and not repaired" in done.out
    assert "its sidecar is missing or unreadable" in done.err
    assert sidecar.parse(garbage.read_bytes()).verification.sha256 == recorded_sha(site.paths[0])
    (problem,) = site.status()["scrub_problems"]
    assert (problem["location"], problem["result"]) == (site.copy_location(site.paths[0]), "repaired")


def test_an_unreadable_copy_without_a_local_source_is_reported_bad(local_site: Site, ckptd: Ckptd) -> None:
    """A garbage sidecar on the target whose local checkpoint is gone cannot be repaired: reported bad, exit 1."""
    site = local_site
    (site.root / "backup" / NODE / "w" / "exp" / f"{site.paths[0].name}{sidecar.SIDECAR_SUFFIX}").write_text(
        "{not json"
    )
    site.paths[0].unlink()
    done = ckptd("scrub", "--config", site.config)
    assert done.code == 1
    assert "1 bad and not repaired" in done.out
    assert f"bad: {site.copy_location(site.paths[0])}" in done.err
    (problem,) = site.status()["scrub_problems"]
    assert (problem["location"], problem["result"]) == (site.copy_location(site.paths[0]), "mismatch")


def test_a_checkpoint_rewritten_since_it_was_verified_is_skipped_not_quarantined(tmp_path: Path, ckptd: Ckptd) -> None:
    """New bytes with a new mtime are a rewrite for the daemon to verify again, not rot: skipped, left in place."""
    site = Site(tmp_path, ckptd)
    path = site.paths[0]
    checkpoints.torch_zip(path, epoch=1, global_step=150, size_floats=8192)
    done, report = site.scrub()
    assert done.code == 0, done.err
    assert report["skipped"] == [str(path)] and report["quarantined"] == []
    assert path.is_file() and site.status()["scrub_problems"] == []


# ---------------------------------------------------------------------------------------------- resume


class Recording:
    """A target that records the keys it is asked to hash, passing everything to the real target."""

    def __init__(self, real: Any) -> None:
        self.real, self.name, self.url = real, real.name, real.url
        self.hashed: list[str] = []

    def sha256(self, key: str) -> str:
        self.hashed.append(key.rsplit("/", 1)[-1])
        digest: str = self.real.sha256(key)
        return digest

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_scrub_resumes_after_a_restart_with_the_least_recently_scrubbed(
    local_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped scrub leaves progress in the catalog; the next one (new connection) starts with the rest."""
    config = load_config(local_site.config)
    names = [p.name for p in local_site.paths]
    order: list[str] = []
    real_hash = scrubbing.hash_throttled

    def recording_hash(path: Path, limit: Throttle, root: Path, progress: Callable[[int], None] | None = None) -> str:
        order.append(path.name)
        return real_hash(path, limit, root, progress)

    monkeypatch.setattr(scrubbing, "hash_throttled", recording_hash)

    def stop_after(n: int) -> Callable[[], bool]:
        asked = iter(range(10**6))
        return lambda: next(asked) >= n

    def scrub_once(now: float, stop: Callable[[], bool]) -> tuple[scrubbing.ScrubReport, list[str]]:
        order.clear()
        target = Recording(targets_of(config)["backup"])
        with Catalog(config.daemon.state_dir) as catalog:  # a fresh connection: what a restart has
            report = scrubbing.scrub(config, catalog, {"backup": target}, now=lambda: now, stop=stop)
        return report, order + target.hashed

    report, seen = scrub_once(100.0, stop_after(1))
    assert seen == names[:1] and report.checked == 1
    with Catalog(config.daemon.state_dir) as catalog:
        assert [Path(r.path).name for r in catalog.scrub_order("w")] == [*names[1:], names[0]]

    report, seen = scrub_once(200.0, stop_after(4))  # the two never scrubbed, the first again, then one copy
    assert seen[:3] == [*names[1:], names[0]] and len(seen) == 4
    first_copy = seen[3]
    report, seen = scrub_once(300.0, stop_after(10))
    assert seen[:3] == names  # all scrubbed at 200: by path
    assert sorted(seen[3:5]) == sorted(n for n in names if n != first_copy)  # copies: the unscrubbed two first
    assert seen[5:] == [first_copy]
    assert report.checked == report.ok == 6


# ---------------------------------------------------------------------------------------------- daemon


def test_daemon_schedules_scrub_every_scrub_interval_and_its_job_quarantines_rot(tmp_path: Path, ckptd: Ckptd) -> None:
    """`[daemon] scrub_interval = "7d"` registers a scrub job every 7 days; the job scrubs like `ckptd scrub`."""
    site = Site(tmp_path, ckptd, daemon='scrub_interval = "7d"\nscrub_bandwidth = "50MB/s"')
    daemon = Daemon(site.config)
    assert (daemon.config.daemon.scrub_interval, daemon.config.daemon.scrub_bandwidth) == (7 * 86400, 50_000_000)
    daemon._schedule_jobs()
    job = daemon.scheduler._scheduler.get_job("scrub")
    assert job is not None and job.trigger.interval.total_seconds() == 7 * 86400
    rot(site.paths[0])
    daemon.scrub_job()
    assert not site.paths[0].exists()
    assert [p["result"] for p in site.status()["scrub_problems"]] == ["quarantined"]

    site.config.write_text(site.config.read_text().replace('scrub_interval = "7d"\n', ""))
    plain = Daemon(site.config)
    plain._schedule_jobs()
    assert plain.scheduler._scheduler.get_job("scrub") is None
