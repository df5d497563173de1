"""Mirror targets that lie: hostile index files, forged copies, a link that corrupts uploads in transit.

Whoever can write a bucket or a backup folder can write its index.json, its sidecars and its objects. None of
that may make `restore` write outside `--to`, make a mirror pass delete another run's copy, or pass a copy
that is not the one this machine mirrored. The S3 cases run against moto's server on loopback (a FlippingProxy
in front of it for the corrupting link); the local ones against a real folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import checkpoints
import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mirror import Site, _enqueue
from test_mirror import local_site as local_site  # the fixture: exp1 and exp10/seed0 mirrored to ./backup

from ckptd import mirror as mirroring
from ckptd import sidecar
from ckptd.config import MirrorTargetConfig, default_node
from ckptd.mirror import mirror_pass, targets_of
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, make_target
from ckptd.mirrors.s3 import S3Target

NODE = default_node()  # this box's namespace on every target ([daemon] node left out)

if TYPE_CHECKING:
    from cli_fixtures import Ckptd
    from mirror_fixtures import Bucket, FlippingProxy, MotoS3


def run(ckptd: Ckptd, *args: object) -> tuple[int, str, str]:
    """The in-process command line (the `ckptd` fixture), as (exit status, stdout, stderr)."""
    done = ckptd(*args)
    return done.code, done.out, done.err


def snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """{path: sha256 or '<dir>'} of everything under root, except under `skip`."""
    found = {}
    for path in sorted(root.rglob("*")):
        if any(path.is_relative_to(s) for s in skip):
            continue
        found[str(path)] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _plant(bucket: Bucket, prefix: str, name: str, data: bytes, *, index: dict[str, Any] | None = None) -> None:
    """Put an object named `name` under `prefix` with a matching sidecar, and an index naming it as latest."""
    client = bucket.server.client()
    digest = hashlib.sha256(data).hexdigest()
    record = {"schema_version": 1, "path": f"/x/{name}", "status": "ok", "format": "torch_zip",
              "size_bytes": len(data), "sha256": digest, "mtime": 0.0, "inode": 1, "mtime_ns": 0, "device": 0,
              "problems": [], "warnings": [], "unsafe_globals": [], "epoch": 1, "global_step": 1, "metrics": {},
              "producer": "torch", "keys": [], "tensors": {"count": 0, "parameters": 0, "bytes": 0, "dtypes": {},
              "nonfinite": 0}, "files": None, "seconds": 0.0, "verified_at": "2026-01-01T00:00:00Z", "host": "evil",
              "ckptd_version": "0.1.0", "engine": {}, "pinned": False}  # fmt: skip
    client.put_object(Bucket=bucket.name, Key=f"{prefix}/{name}", Body=data)
    client.put_object(Bucket=bucket.name, Key=f"{prefix}/{name}.ckptd.json", Body=json.dumps(record).encode())
    body = index or {"schema_version": 1, "run": prefix, "latest": {"name": name, "sha256": digest},
                     "best": None, "copies": {name: {"name": name, "sha256": digest}}, "superseded": []}  # fmt: skip
    client.put_object(Bucket=bucket.name, Key=f"{prefix}/index.json", Body=json.dumps(body).encode())


def _s3_target(bucket: Bucket, tmp_path: Path) -> S3Target:
    target = make_target("s3", MirrorTargetConfig(url=f"s3://{bucket.name}", endpoint_url=bucket.endpoint), tmp_path)
    assert isinstance(target, S3Target)
    return target


# ------------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("name", ["../../home/u/.bashrc", "/abs/evil.pt", "..", "a/b.pt", ".", "x\x00.pt"])
def test_restore_from_a_hostile_s3_index_writes_nothing_outside_to(s3_bucket: Bucket, tmp_path: Path,
                                                                   name: str) -> None:  # fmt: skip
    """An index naming `../../home/u/.bashrc` or `/abs/path`, with objects at those keys and a matching sidecar,
    is refused with a clear error before anything is created; nothing outside --to changes."""
    _plant(s3_bucket, "runs/exp1", name, b"echo pwned\n")
    to = tmp_path / "home" / "restore"
    before = snapshot(tmp_path)
    with pytest.raises(NotFound, match="index"):
        mirroring.restore(_s3_target(s3_bucket, tmp_path), "runs/exp1", "latest", to, known=lambda n: None)
    assert snapshot(tmp_path, skip=(to,)) == before
    assert not to.exists() or list(to.iterdir()) == []


def test_restore_through_the_cli_refuses_the_hostile_entry_and_says_why(s3_bucket: Bucket, tmp_path: Path,
                                                                       ckptd: Ckptd) -> None:  # fmt: skip
    """`ckptd restore` on such an index exits 1, logs the refused name and writes nothing."""
    _plant(s3_bucket, f"{NODE}/runs/exp1", "../../../etc/cron.d/evil", b"* * * * * root sh\n")  # this box's
    config = tmp_path / "config.toml"
    config.write_text(f'[[watch]]\nname = "runs"\npath = "runs"\n[mirror.s3]\nurl = "s3://{s3_bucket.name}"\n'
                      f'endpoint_url = "{s3_bucket.endpoint}"\n')  # fmt: skip
    done = ckptd("restore", "s3", "runs/exp1", "--latest", "--to", tmp_path / "out", "--config", config)
    code, out, err = done.code, done.out, done.err
    assert code == 1 and out == ""
    assert "index names refused" in err and "the index names no latest checkpoint" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


names = st.lists(st.sampled_from(["..", ".", "/", "a", "b", ".bashrc", "etc", "\\", "x.pt", "~", ""]), min_size=1,
                 max_size=6).map("".join) | st.text(max_size=20)  # fmt: skip


@given(latest=names, best=names, superseded=st.lists(names, max_size=3), extra=st.lists(names, max_size=3))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_generated_index_makes_restore_touch_a_path_outside_to(
    s3_bucket: Bucket, tmp_path: Path, latest: str, best: str, superseded: list[str], extra: list[str]
) -> None:
    """Whatever names an index holds, and whatever objects sit at the keys they spell, restore either refuses or
    writes one proved file directly inside --to; nothing else on disk changes."""
    root = Path(tempfile.mkdtemp(dir=tmp_path, prefix="fuzz-"))
    to = root / "restore"
    to.mkdir()
    data = b"payload"
    digest = hashlib.sha256(data).hexdigest()
    index = {"latest": {"name": latest, "sha256": digest}, "best": {"name": best, "sha256": digest},
             "copies": {n: {"sha256": digest} for n in [latest, best, *extra]}, "superseded": superseded}  # fmt: skip
    for name in {latest, best, *extra}:
        with contextlib.suppress(ClientError):  # a key the store itself refuses cannot be an attack
            _plant(s3_bucket, "runs/fuzz", name, data, index=index)
    before = snapshot(tmp_path, skip=(to,))
    target = _s3_target(s3_bucket, tmp_path)
    for role in ("latest", "best"):
        try:
            found = mirroring.restore(target, "runs/fuzz", role, to, known=lambda n: None)
        except (MirrorError, sidecar.SidecarError, ValueError):
            continue
        assert found.path.parent == to and found.path.read_bytes() == data
    assert snapshot(tmp_path, skip=(to,)) == before
    assert all(p.parent == to for p in to.iterdir())


def test_restore_proves_against_the_local_catalog_and_says_so(local_site: Site, tmp_path: Path, ckptd: Ckptd) -> None:
    """On the machine that mirrored it, restore checks the bytes against its catalog's SHA-256 and says which
    proof it used; on a fresh machine (no catalog) it says it used the mirrored sidecar."""
    with local_site.catalog() as catalog:
        _enqueue(catalog, local_site.config)
        mirror_pass(local_site.config, catalog, targets_of(local_site.config))
    code, out, err = run(ckptd, "restore", "local", "runs/exp1", "--latest", "--to", tmp_path / "back",
                           "--config", local_site.config_path)  # fmt: skip
    assert code == 0, err
    assert "proved against this machine's catalog" in err and out.strip().endswith(local_site.latest.name)
    (local_site.root / "state" / "catalog.sqlite3").unlink()
    code, _out, err = run(ckptd, "restore", "local", "runs/exp1", "--latest", "--to", tmp_path / "fresh",
                            "--config", local_site.config_path)  # fmt: skip
    assert code == 0 and "proved against the mirrored sidecar" in err


# ----------------------------------------------------------------------------------------- forged copies


def _forge(site: Site, victim: Path, impostor: Path) -> None:
    """Rewrite the copy of `victim` on the local target with `impostor`'s bytes, and its sidecar and index entry
    to match: consistent to anyone who trusts only the target."""
    folder = site.root / "backup" / NODE / "runs" / "exp1"
    (folder / victim.name).write_bytes(impostor.read_bytes())
    forged = json.loads(sidecar.sidecar_path(impostor).read_bytes())
    forged["path"] = str(victim)
    (folder / f"{victim.name}.ckptd.json").write_text(json.dumps(forged))
    index = json.loads((folder / "index.json").read_bytes())
    for entry in [
        index["copies"][victim.name],
        *(index[r] for r in ("best", "latest") if index[r]["name"] == victim.name),
    ]:
        entry["sha256"] = forged["sha256"]
    (folder / "index.json").write_text(json.dumps(index))


def test_a_consistently_forged_copy_fails_verify_scrub_and_restore_where_the_catalog_knows(
    local_site: Site, tmp_path: Path, ckptd: Ckptd
) -> None:
    """A copy replaced on the target together with its sidecar and index is caught by `mirror --verify` (and
    repaired from the local checkpoint), by `scrub`, and refused by `restore`, on the machine that mirrored it."""
    site = local_site
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        mirror_pass(site.config, catalog, targets_of(site.config))
    impostor = checkpoints.torch_zip(tmp_path / "impostor" / "x.pt", global_step=999, size_floats=300)
    from ckptd.scan import sidecar_bytes
    from ckptd.verify import engine_versions, verify

    sidecar.write(impostor, sidecar_bytes(verify(impostor), engine_versions(), 0.0))
    _forge(site, site.latest, impostor)
    code, _out, err = run(ckptd, "restore", "local", "runs/exp1", "--latest", "--to", tmp_path / "out",
                            "--config", site.config_path)  # fmt: skip
    assert code == 1 and "the copy was replaced since; not restored" in err
    assert not (tmp_path / "out" / site.latest.name).exists()
    code, _out, err = run(ckptd, "scrub", "--config", site.config_path)
    assert "not the copy that was made" in err
    _forge(site, site.latest, impostor)
    code, out, err = run(ckptd, "mirror", "--verify", "--config", site.config_path)
    assert "1 bad, 1 repaired" in out, out + err
    copy = site.root / "backup" / NODE / "runs" / "exp1" / site.latest.name
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == hashlib.sha256(site.latest.read_bytes()).hexdigest()
    code, _out, err = run(ckptd, "restore", "local", "runs/exp1", "--latest", "--to", tmp_path / "out",
                            "--config", site.config_path)  # fmt: skip
    assert code == 0, err


# ------------------------------------------------------------------------------------- deleting copies


def test_a_hostile_superseded_list_never_deletes_another_runs_copy(local_site: Site) -> None:
    """`superseded` in a run's index naming `../exp10/seed0/<copy>` (another run's) or a copy this machine never
    made: the next mirror pass drops those names from the index and deletes neither."""
    site = local_site
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        mirror_pass(site.config, catalog, targets_of(site.config))
    backup = site.root / "backup" / NODE / "runs"
    foreign = backup / "exp1" / "someone-elses.pt"
    foreign.write_bytes(b"not ours")
    other = backup / "exp10" / "seed0" / "epoch=1-step=50.pt"
    assert other.exists()
    index_path = backup / "exp1" / "index.json"
    index = json.loads(index_path.read_bytes())
    index["superseded"] = ["../exp10/seed0/epoch=1-step=50.pt", "someone-elses.pt", "/etc/passwd"]
    index["copies"]["someone-elses.pt"] = {"sha256": "0" * 64}
    index_path.write_text(json.dumps(index))
    site.add(400, 0.2)  # a new best and latest: the old ones are superseded (keep_superseded = 0)
    with site.catalog() as catalog:
        _enqueue(catalog, site.config)
        report = mirror_pass(site.config, catalog, targets_of(site.config))
    assert report.failed == []
    assert other.exists() and foreign.read_bytes() == b"not ours"
    assert not (backup / "exp1" / site.latest.name).exists(), "our own superseded copy is deleted as before"
    after = json.loads(index_path.read_bytes())
    assert "../exp10/seed0/epoch=1-step=50.pt" not in after["superseded"] and "/etc/passwd" not in after["superseded"]


# --------------------------------------------------------------------------------- corrupted in transit


@pytest.mark.parametrize("size", [300_000, 70 << 20], ids=["single PUT", "multipart"])
def test_an_upload_corrupted_in_transit_is_never_counted_as_proved(
    flipping_proxy: FlippingProxy, s3_bucket: Bucket, tmp_path: Path, size: int
) -> None:
    """A link that flips a byte of the upload, to a store that echoes the checksum header it was sent (moto, like
    some S3-compatible stores): the store's own MD5 ETag disagrees, the read-back confirms it, the bad object is
    removed, and put_file raises IntegrityError."""
    settings = MirrorTargetConfig(url=f"s3://{s3_bucket.name}", endpoint_url=flipping_proxy.endpoint)
    target = make_target("s3", settings, tmp_path)
    source = tmp_path / "x.ckpt"
    source.write_bytes(os.urandom(size))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError, match="does not match sha256"):
        target.put_file("run/x.ckpt", source, sha256=digest)
    assert flipping_proxy.flipped >= 1
    assert s3_bucket.keys("run/") == []


def test_the_same_upload_through_a_clean_link_is_proved_without_a_read_back(
    moto_s3: MotoS3, s3_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the corrupting link the ETag matches the local MD5s and no read-back is needed."""
    target = _s3_target(s3_bucket, tmp_path)
    source = tmp_path / "x.ckpt"
    source.write_bytes(os.urandom(300_000))

    def refuse(key: str) -> str:
        raise AssertionError("read back although the ETag proved the copy")

    monkeypatch.setattr(target, "sha256", refuse)
    target.put_file("run/x.ckpt", source, sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    assert boto3.client("s3", endpoint_url=moto_s3.endpoint).head_object(Bucket=s3_bucket.name, Key="run/x.ckpt")
