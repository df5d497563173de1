"""One contract suite for every mirror backend: a local folder and S3 (moto's standalone server on loopback).

Each test runs against both backends through `make_target`, the factory ckptd itself uses. The few checks
that only one backend can make (S3's composite checksum, S3 with `checksum = "off"`) say so in their names.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.exceptions import ClientError

from ckptd.config import MirrorTargetConfig, parse_config
from ckptd.errors import ConfigError
from ckptd.fsutil import TEMP_MARK, temp_name
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, RemoteObject, Target, make_target
from ckptd.mirrors.local import LocalTarget
from ckptd.mirrors.s3 import S3Target, composite_sha256

if TYPE_CHECKING:
    from mirror_fixtures import Bucket

BIG = 70 << 20  # above the 64 MiB multipart threshold: two parts
PART = 64 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty target of each backend, built by make_target from a [mirror.NAME] section."""
    if request.param == "local":
        return make_target("backup", MirrorTargetConfig(url="backup"), tmp_path)
    bucket: Bucket = request.getfixturevalue("s3_bucket")
    settings = MirrorTargetConfig(url=f"s3://{bucket.name}/mirror", endpoint_url=bucket.endpoint, region="us-east-1")
    return make_target("s3", settings, tmp_path)


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 70 MiB file of random bytes and its SHA-256, written once for the session."""
    path = tmp_path_factory.mktemp("big") / "big.ckpt"
    data = os.urandom(BIG)
    path.write_bytes(data)
    return path, _sha(data)


def _small(tmp_path: Path, data: bytes = b"checkpoint bytes " * 1000) -> tuple[Path, str]:
    path = tmp_path / "small.ckpt"
    path.write_bytes(data)
    return path, _sha(data)


def _no_read_back(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a second read of the stored object fail the test: the copy must be proved without one."""

    def refuse(key: str) -> str:
        raise AssertionError(f"put_file read {key} back instead of proving it while copying")

    monkeypatch.setattr(target, "sha256", refuse)


def _leftovers(target: Target) -> list[str]:
    """Temp files a local target still holds (S3 has none to show: an unfinished upload is no object)."""
    if isinstance(target, LocalTarget) and target.root.exists():
        return [str(p) for p in target.root.rglob(f"*{TEMP_MARK}*")]
    return []


# ------------------------------------------------------------------------------------------------ put_file


def test_put_file_stores_the_bytes_and_proves_them(target: Target, tmp_path: Path) -> None:
    """put_file stores the file under its key; stat, get_bytes and a full read-back all agree with the source."""
    source, digest = _small(tmp_path)
    target.put_file("runs/exp1/epoch=1.ckpt", source, sha256=digest)
    assert target.stat("runs/exp1/epoch=1.ckpt") == RemoteObject("runs/exp1/epoch=1.ckpt", source.stat().st_size)
    assert target.get_bytes("runs/exp1/epoch=1.ckpt") == source.read_bytes()
    assert target.sha256("runs/exp1/epoch=1.ckpt") == digest
    assert list(target.list()) == ["runs/exp1/epoch=1.ckpt"]


def test_put_file_with_a_wrong_sha256_raises_integrity_error_and_keeps_no_object(
    target: Target, tmp_path: Path
) -> None:
    """A copy that does not match the expected SHA-256 raises IntegrityError and leaves nothing on the target."""
    source, _digest = _small(tmp_path)
    with pytest.raises(IntegrityError):
        target.put_file("runs/exp1/epoch=1.ckpt", source, sha256="0" * 64)
    assert target.stat("runs/exp1/epoch=1.ckpt") is None
    assert list(target.list()) == []
    assert _leftovers(target) == []


def test_put_file_twice_with_the_same_bytes_is_harmless(target: Target, tmp_path: Path) -> None:
    """Putting the same file again (a retried copy) leaves one object with the same bytes."""
    source, digest = _small(tmp_path)
    target.put_file("a/x.ckpt", source, sha256=digest)
    target.put_file("a/x.ckpt", source, sha256=digest)
    assert list(target.list()) == ["a/x.ckpt"]
    assert target.sha256("a/x.ckpt") == digest


def test_put_file_replaces_an_older_object_under_the_same_key(target: Target, tmp_path: Path) -> None:
    """A new version of last.ckpt replaces the old object whole."""
    old, old_digest = _small(tmp_path, b"old" * 100)
    target.put_file("run/last.ckpt", old, sha256=old_digest)
    new = tmp_path / "new.ckpt"
    new.write_bytes(b"new version" * 300)
    target.put_file("run/last.ckpt", new, sha256=_sha(new.read_bytes()))
    assert target.get_bytes("run/last.ckpt") == new.read_bytes()


def test_large_upload_is_multipart_invisible_until_complete_and_proved_while_copying(
    target: Target, big_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 70 MiB copy is never visible in part (listed or stat'ed from another thread) and is proved without a re-read.

    On S3 it goes up in two parts and is proved by the composite checksum S3 reports, computed locally too.
    """
    source, digest = big_file
    key = "runs/exp1/big.ckpt"
    seen: list[tuple[list[str], RemoteObject | None]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append((list(target.list("runs/")), target.stat(key)))
            time.sleep(0.002)

    observer = threading.Thread(target=watch)
    _no_read_back(target, monkeypatch)
    observer.start()
    try:
        target.put_file(key, source, sha256=digest)
    finally:
        done.set()
        observer.join()
    monkeypatch.undo()
    assert len(seen) >= 3, "the observer must have looked while the upload ran"
    for listed, found in seen:
        assert listed in ([], [key]), f"something other than the finished object was listed: {listed}"
        assert found is None or found.size == BIG, f"a partial object was visible: {found}"
    assert target.stat(key) == RemoteObject(key, BIG)
    assert target.sha256(key) == digest
    if isinstance(target, S3Target):
        head = target.client.head_object(Bucket=target.bucket, Key=target._key(key), ChecksumMode="ENABLED")
        assert head["ETag"].strip('"').endswith("-2"), "uploaded as two parts"
        data = source.read_bytes()
        parts = [hashlib.sha256(data[i : i + PART]).digest() for i in range(0, BIG, PART)]
        assert head["ChecksumSHA256"].split("-")[0] == composite_sha256(parts).split("-")[0]


def test_put_file_reports_progress_in_bytes(target: Target, tmp_path: Path) -> None:
    """The progress callback receives byte counts that add up to the file's size."""
    source, digest = _small(tmp_path, os.urandom(300_000))
    moved: list[int] = []
    target.put_file("run/x.ckpt", source, sha256=digest, progress=moved.append)
    assert moved and sum(moved) == 300_000


def test_deleting_every_key_leaves_an_empty_target(target: Target) -> None:
    """Deleting the last keys of a run leaves nothing behind: no key, and in a folder no empty run folders."""
    target.put_bytes("runs/exp1/deep/x", b"1")
    target.put_bytes("runs/exp1/y", b"2")
    target.delete("runs/exp1/deep/x")
    target.delete("runs/exp1/y")
    assert list(target.list()) == []
    if isinstance(target, LocalTarget):
        assert list(target.root.iterdir()) == []


# ----------------------------------------------------------------------------------------- small objects


def test_put_bytes_and_get_bytes_round_trip_and_overwrite(target: Target) -> None:
    """put_bytes stores a small object; get_bytes returns it; a second put_bytes replaces it."""
    target.put_bytes("runs/exp1/index.json", b'{"a": 1}')
    assert target.get_bytes("runs/exp1/index.json") == b'{"a": 1}'
    target.put_bytes("runs/exp1/index.json", b'{"a": 2}')
    assert target.get_bytes("runs/exp1/index.json") == b'{"a": 2}'
    assert target.stat("runs/exp1/index.json") == RemoteObject("runs/exp1/index.json", 8)


def test_get_bytes_and_sha256_of_a_missing_key_raise_not_found(target: Target) -> None:
    """Reading a key that does not exist raises NotFound, not a generic error."""
    with pytest.raises(NotFound):
        target.get_bytes("runs/nothing/index.json")
    with pytest.raises(NotFound):
        target.sha256("runs/nothing/x.ckpt")


def test_sha256_reads_the_stored_object_back(target: Target) -> None:
    """sha256 hashes what the target holds, so a changed object shows a different hash."""
    target.put_bytes("k/one", b"first")
    assert target.sha256("k/one") == _sha(b"first")
    target.put_bytes("k/one", b"tampered")
    assert target.sha256("k/one") == _sha(b"tampered")


def test_stat_is_none_for_a_missing_key(target: Target) -> None:
    """stat answers None for a key that does not exist (and for a folder-like prefix)."""
    target.put_bytes("runs/exp1/x", b"1")
    assert target.stat("runs/exp1/y") is None
    assert target.stat("nothing/at/all") is None


def test_delete_is_idempotent(target: Target) -> None:
    """Deleting removes the object; deleting it again, or a key that never existed, is not an error."""
    target.put_bytes("runs/exp1/x", b"1")
    target.put_bytes("runs/exp1/y", b"2")
    target.delete("runs/exp1/x")
    target.delete("runs/exp1/x")
    target.delete("never/existed")
    assert target.stat("runs/exp1/x") is None
    assert list(target.list()) == ["runs/exp1/y"]


def test_list_is_a_sorted_string_prefix_match_without_temp_files(target: Target) -> None:
    """list(prefix) returns every key starting with the string prefix, sorted, as S3 does; temp files are no keys."""
    for key in ("a/c", "a/bc/z", "ab", "a/b/y.json", "a/b/x"):
        target.put_bytes(key, key.encode())
    if isinstance(target, LocalTarget):  # what a killed copy leaves behind is not an object
        (target.root / "a" / "b" / f".x.1234{TEMP_MARK}").write_bytes(b"half")
    assert list(target.list()) == ["a/b/x", "a/b/y.json", "a/bc/z", "a/c", "ab"]
    assert list(target.list("a/b")) == ["a/b/x", "a/b/y.json", "a/bc/z"]
    assert list(target.list("a/b/")) == ["a/b/x", "a/b/y.json"]
    assert list(target.list("a")) == ["a/b/x", "a/b/y.json", "a/bc/z", "a/c", "ab"]
    assert list(target.list("a/b/x")) == ["a/b/x"]
    assert list(target.list("zzz/")) == []


# ------------------------------------------------------------------------------------------------ sweep


def _leave_a_dead_copy(target: Target, key: str) -> None:
    """What a copy killed half-way leaves: a temp file in a local folder; on S3, a multipart upload with one
    part and never completed (made with boto3 directly, under the target's prefix)."""
    if isinstance(target, LocalTarget):
        folder = target.root.joinpath(*key.split("/")[:-1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / temp_name(key.rsplit("/", 1)[1])).write_bytes(b"half a checkpoint")
        return
    assert isinstance(target, S3Target)
    started = target.client.create_multipart_upload(Bucket=target.bucket, Key=target._key(key))
    target.client.upload_part(Bucket=target.bucket, Key=target._key(key), UploadId=started["UploadId"], PartNumber=1,
                              Body=b"half a checkpoint")  # fmt: skip


def _dead_copies(target: Target) -> list[str]:
    """Temp files in a local folder; incomplete multipart uploads anywhere in an S3 bucket."""
    if isinstance(target, LocalTarget):
        return _leftovers(target)
    assert isinstance(target, S3Target)
    return [str(u["Key"]) for u in target.client.list_multipart_uploads(Bucket=target.bucket).get("Uploads", [])]


def test_sweep_removes_what_killed_copies_left_once_idle_and_nothing_else(target: Target, tmp_path: Path) -> None:
    """A killed copy's temp file (local) or incomplete multipart upload (S3) is left alone while it may still be
    running somewhere (idle less than `idle_for`), then removed; objects, sidecars and index files stay."""
    source, digest = _small(tmp_path)
    target.put_file("runs/exp1/a.ckpt", source, sha256=digest)
    target.put_bytes("runs/exp1/a.ckpt.ckptd.json", b"{}")
    target.put_bytes("runs/exp1/index.json", b"{}")
    _leave_a_dead_copy(target, "runs/exp1/b.ckpt")
    _leave_a_dead_copy(target, "runs/exp2/deep/c.ckpt")
    keys = list(target.list())
    assert target.sweep(3600) == [] and len(_dead_copies(target)) == 2  # just started: maybe still running
    removed = target.sweep(0)
    assert len(removed) == 2 and all(r.startswith(f"{target.name}:runs/exp") for r in removed)
    assert _dead_copies(target) == [] and list(target.list()) == keys
    assert target.sha256("runs/exp1/a.ckpt") == digest
    assert target.sweep(0) == []


def test_local_sweep_goes_by_the_time_a_temp_file_was_last_written(tmp_path: Path) -> None:
    """A temp file not written to for over an hour goes at the default age; a fresh one stays; a link named
    like a temp file is no file of ckptd's and is never followed."""
    target = make_target("backup", MirrorTargetConfig(url="backup"), tmp_path)
    assert isinstance(target, LocalTarget)
    _leave_a_dead_copy(target, "runs/old.ckpt")
    _leave_a_dead_copy(target, "runs/new.ckpt")
    old = next(p for p in target.root.rglob(f"*{TEMP_MARK}") if "old" in p.name)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"x{TEMP_MARK}").write_bytes(b"not the target's")
    (target.root / "runs" / "link").symlink_to(outside, target_is_directory=True)
    assert target.sweep() == [f"backup:runs/{old.name} (17 bytes)"]
    fresh = [p.name for p in (target.root / "runs").iterdir() if TEMP_MARK in p.name]
    assert len(fresh) == 1 and "new.ckpt" in fresh[0] and (outside / f"x{TEMP_MARK}").exists()


def test_s3_sweep_stays_under_the_targets_prefix(s3_bucket: Bucket, tmp_path: Path) -> None:
    """An incomplete upload elsewhere in the bucket (another prefix: someone else's) is never aborted."""
    settings = MirrorTargetConfig(url=f"s3://{s3_bucket.name}/mirror", endpoint_url=s3_bucket.endpoint)
    target = make_target("s3", settings, tmp_path)
    assert isinstance(target, S3Target)
    client = s3_bucket.server.client()
    other = client.create_multipart_upload(Bucket=s3_bucket.name, Key="elsewhere/x.ckpt")
    _leave_a_dead_copy(target, "runs/x.ckpt")
    removed = target.sweep(0)
    assert len(removed) == 1 and removed[0].startswith("s3:runs/x.ckpt (incomplete upload ")
    assert _dead_copies(target) == ["elsewhere/x.ckpt"]
    client.abort_multipart_upload(Bucket=s3_bucket.name, Key="elsewhere/x.ckpt", UploadId=other["UploadId"])


def test_s3_a_multipart_upload_that_fails_leaves_no_incomplete_upload(
    s3_bucket: Bucket, tmp_path: Path, big_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part refused mid-upload: put_file raises MirrorError, and the upload it started is aborted (s3transfer's
    own failure cleanup), so nothing is left for the sweep."""
    settings = MirrorTargetConfig(url=f"s3://{s3_bucket.name}/mirror", endpoint_url=s3_bucket.endpoint)
    target = make_target("s3", settings, tmp_path)
    assert isinstance(target, S3Target)
    real = target.client.upload_part

    def refuse_the_second(**kwargs: object) -> object:
        if kwargs.get("PartNumber") == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "refused"}}, "UploadPart")
        return real(**kwargs)

    monkeypatch.setattr(target.client, "upload_part", refuse_the_second)
    source, digest = big_file
    with pytest.raises(MirrorError):
        target.put_file("runs/big.ckpt", source, sha256=digest)
    assert _dead_copies(target) == [] and s3_bucket.keys() == []


# --------------------------------------------------------------------------------------------- get_file


def test_read_into_writes_the_object_into_an_open_file(target: Target, tmp_path: Path) -> None:
    """read_into copies the object's bytes into a file the caller opened (from its start), reports progress,
    and raises NotFound for a missing key without writing anything."""
    source, digest = _small(tmp_path, os.urandom(200_000))
    target.put_file("run/x.ckpt", source, sha256=digest)
    out = tmp_path / "out.ckpt"
    moved: list[int] = []
    with open(out, "wb") as handle:
        target.read_into("run/x.ckpt", handle.fileno(), progress=moved.append)
    assert out.read_bytes() == source.read_bytes() and sum(moved) == 200_000
    empty = tmp_path / "empty"
    with open(empty, "wb") as handle, pytest.raises(NotFound):
        target.read_into("run/missing.ckpt", handle.fileno())
    assert empty.read_bytes() == b""


def test_get_bytes_refuses_an_object_too_large_to_be_an_index(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile target cannot make ckptd read gigabytes into memory as an index.json or sidecar."""
    import ckptd.mirrors.local
    import ckptd.mirrors.s3

    target.put_bytes("run/index.json", b"x" * 2000)
    for module in (ckptd.mirrors.local, ckptd.mirrors.s3):
        monkeypatch.setattr(module, "SMALL_OBJECT_MAX", 1000)
    with pytest.raises(MirrorError, match="is over 1000 bytes; not a ckptd index or sidecar"):
        target.get_bytes("run/index.json")


@pytest.mark.parametrize("key", ["../escaped", "run/../../escaped", "/etc/escaped", "run//x", "run/./x"])
def test_keys_that_could_climb_out_are_refused(target: Target, key: str, tmp_path: Path) -> None:
    """A key with `..`, `.`, an empty part or a leading '/' is refused by the local target and never written
    outside it; S3 keys are plain strings inside the bucket's prefix, and these stay there."""
    if isinstance(target, LocalTarget):
        with pytest.raises(MirrorError, match="outside the target"):
            target.put_bytes(key, b"x")
        assert not (tmp_path / "escaped").exists() and not Path("/etc/escaped").exists()
    else:
        target.put_bytes(key, b"x")
        assert all(k.startswith("mirror/") for k in _all_keys(target))


def _all_keys(target: Target) -> list[str]:
    assert isinstance(target, S3Target)
    pages = target.client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket)
    return [str(item["Key"]) for page in pages for item in page.get("Contents", [])]


def test_local_target_never_follows_a_link_inside_it(tmp_path: Path) -> None:
    """A folder of the target swapped for a link to a folder outside: writes, reads and deletes through it fail,
    and nothing outside is touched; a link where an object should be is no object."""
    target = make_target("backup", MirrorTargetConfig(url="backup"), tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.ckpt").write_bytes(b"precious")
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "run").symlink_to(outside, target_is_directory=True)
    source, digest = _small(tmp_path)
    for action in (
        lambda: target.put_file("run/x.ckpt", source, sha256=digest),
        lambda: target.put_bytes("run/x.ckpt", b"x"),
        lambda: target.get_bytes("run/x.ckpt"),
        lambda: target.sha256("run/x.ckpt"),
        lambda: target.delete("run/x.ckpt"),
    ):
        with pytest.raises(MirrorError, match="is a link or no folder; not followed"):
            action()
    assert (outside / "x.ckpt").read_bytes() == b"precious" and list(target.list()) == []
    (tmp_path / "backup" / "run").unlink()
    (tmp_path / "backup" / "run").mkdir()
    (tmp_path / "backup" / "run" / "y.ckpt").symlink_to(outside / "x.ckpt")
    assert target.stat("run/y.ckpt") is None and list(target.list()) == []


# ------------------------------------------------------------------------------------------- S3 only


@pytest.mark.parametrize(("checksum", "proof", "read_back"), [("off", "auto", False), ("sha256", "read-back", True)])
def test_s3_proof_modes(s3_bucket: Bucket, tmp_path: Path, checksum: str, proof: str, read_back: bool) -> None:
    """checksum = "off" sends no checksum header and proves a copy by the store's MD5 ETag (no read-back);
    proof = "read-back" downloads every copy. Either way a copy that does not match is removed."""
    settings = MirrorTargetConfig(url=f"s3://{s3_bucket.name}", endpoint_url=s3_bucket.endpoint, checksum=checksum,
                                  proof=proof)  # fmt: skip
    target = make_target("s3", settings, tmp_path)
    assert isinstance(target, S3Target)
    source, digest = _small(tmp_path)
    reads: list[str] = []
    real = target.sha256

    def counted(key: str) -> str:
        reads.append(key)
        return real(key)

    target.sha256 = counted  # type: ignore[method-assign]
    target.put_file("run/x.ckpt", source, sha256=digest)
    assert reads == (["run/x.ckpt"] if read_back else [])
    head = target.client.head_object(Bucket=s3_bucket.name, Key="run/x.ckpt", ChecksumMode="ENABLED")
    assert ("ChecksumSHA256" in head) is (checksum == "sha256")
    with pytest.raises(IntegrityError):
        target.put_file("run/y.ckpt", source, sha256="f" * 64)
    assert s3_bucket.keys() == ["run/x.ckpt"]


def test_proof_checksum_needs_the_checksum_header(tmp_path: Path) -> None:
    """proof = "checksum" with checksum = "off" is a config error: the store would report nothing to trust."""
    with pytest.raises(ValueError, match="needs checksum"):
        MirrorTargetConfig(url="s3://b", checksum="off", proof="checksum")


def test_s3_keys_live_under_the_url_prefix(s3_bucket: Bucket, tmp_path: Path) -> None:
    """An s3://bucket/prefix target stores keys under the prefix and lists them without it."""
    settings = MirrorTargetConfig(url=f"s3://{s3_bucket.name}/team/mirror/", endpoint_url=s3_bucket.endpoint)
    target = make_target("s3", settings, tmp_path)
    target.put_bytes("runs/exp1/index.json", b"{}")
    assert s3_bucket.keys() == ["team/mirror/runs/exp1/index.json"]
    assert list(target.list()) == ["runs/exp1/index.json"]


def test_s3_credentials_come_only_from_the_aws_chain(
    s3_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key in config.toml is refused; with none in the AWS chain, the target fails naming where they belong."""
    text = f'[[watch]]\nname = "r"\npath = "runs"\n[mirror.s3]\nurl = "s3://{s3_bucket.name}"\n'
    text += f'endpoint_url = "{s3_bucket.endpoint}"\n'
    with pytest.raises(ConfigError, match="credentials never go in the config file"):
        parse_config(text + 'secret_access_key = "hunter2"\n', tmp_path / "config.toml")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it cached the credentials it found earlier
    target = make_target("s3", parse_config(text, tmp_path / "config.toml").mirror["s3"], tmp_path)
    with pytest.raises(MirrorError, match="no AWS credentials") as raised:
        target.put_bytes("x", b"1")
    assert "never config.toml" in str(raised.value)


def test_s3_a_missing_bucket_is_a_mirror_error(s3_bucket: Bucket, tmp_path: Path) -> None:
    """A bucket that does not exist fails every write with a MirrorError naming S3's error code (retried later)."""
    settings = MirrorTargetConfig(url="s3://ckptd-test-no-such-bucket/x", endpoint_url=s3_bucket.endpoint)
    target = make_target("s3", settings, tmp_path)
    with pytest.raises(MirrorError, match="NoSuchBucket"):
        target.put_bytes("runs/index.json", b"{}")
    source, digest = _small(tmp_path)
    with pytest.raises(MirrorError, match="NoSuchBucket"):
        target.put_file("runs/x.ckpt", source, sha256=digest)
    with pytest.raises(MirrorError, match="NoSuchBucket"):
        list(target.list())


def test_local_keys_cannot_escape_the_target_folder_even_on_delete(tmp_path: Path) -> None:
    """A key that climbs out of the target folder ('..') is refused, and nothing is written outside it."""
    target = make_target("backup", MirrorTargetConfig(url="backup"), tmp_path)
    for action in (lambda: target.put_bytes("../escaped", b"x"), lambda: target.delete("runs/../../escaped")):
        with pytest.raises(MirrorError, match="outside the target"):
            action()
    assert not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------------------------------- make_target


def test_make_target_picks_the_backend_by_scheme(tmp_path: Path, aws_env: None) -> None:
    """No scheme or file:// is a local folder (relative to the config's folder); s3:// is S3."""
    relative = make_target("a", MirrorTargetConfig(url="backup/ckpts"), tmp_path)
    assert isinstance(relative, LocalTarget) and relative.root == tmp_path / "backup" / "ckpts"
    absolute = make_target("b", MirrorTargetConfig(url=f"file://{tmp_path}/nfs"), Path("/elsewhere"))
    assert isinstance(absolute, LocalTarget) and absolute.root == tmp_path / "nfs"
    s3 = make_target(
        "c", MirrorTargetConfig(url="s3://ckptd-test-bucket/p", endpoint_url="http://127.0.0.1:9"), tmp_path
    )
    assert isinstance(s3, S3Target) and (s3.bucket, s3.prefix) == ("ckptd-test-bucket", "p")
    assert all(isinstance(t, Target) for t in (relative, absolute, s3))


@pytest.mark.parametrize("url", ["gs://bucket/x", "ftp://host/backup", "azure://c/x"])
def test_make_target_rejects_an_unknown_scheme_with_config_error(tmp_path: Path, url: str) -> None:
    """A URL with any other scheme is a config error naming the key, not a folder called 'gs:'."""
    with pytest.raises(ConfigError) as raised:
        make_target("offsite", MirrorTargetConfig(url=url), tmp_path)
    assert "mirror.offsite.url" in str(raised.value) and url.split("://")[0] in str(raised.value)
