"""S3 and S3-compatible stores (MinIO, Ceph RGW...) as a mirror target; the only boto3 import.

Credentials come from the standard AWS chain (environment, profile, instance role), never from config.toml.
Uploads go through boto3's TransferConfig (multipart, concurrent parts); S3 shows no object until the
upload completes. With `checksum = "sha256"` each request carries its SHA-256 (x-amz-checksum-sha256),
which AWS S3 checks and refuses on a mismatch; botocore's default CRC32 request checksums are turned off,
since they break some S3-compatible stores.

A stored copy must then be proved, and a store that echoes the checksum header without checking it (moto,
MinIO before late 2022, other compatible stores) proves nothing by echoing. `proof` says how:
- "auto" (default): the store's own ETag, which S3, MinIO, Ceph RGW and moto compute server-side as the MD5
  of the bytes they received (for a multipart object, the MD5 of the parts' MD5s and "-<parts>"), is
  compared with the MD5s computed locally while the upload runs. Where they differ (an ETag that is not an
  MD5, as with SSE-KMS or SSE-C on AWS) the copy is read back and hashed, so nothing unproved is kept.
- "checksum": the SHA-256 checksum the store reports is trusted (only for stores that validate it, such
  as AWS S3); a store that reports none is read back.
- "read-back": every copy is downloaded and hashed: the slowest, for stores whose ETag is never an MD5.

Incomplete multipart uploads: an upload that fails is aborted by s3transfer itself (its failure cleanup);
one that cannot be (the store down, the process killed mid-upload) is left for `sweep`, which aborts those
under the target's prefix idle for an hour (no part added), at the mirror thread's start and after each
reconciliation. Only idleness tells a dead upload from one another process is running: the listing of an
upload says nothing about who started it.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ckptd.fsutil import drop_cache
from ckptd.mirrors import (
    SMALL_OBJECT_MAX,
    STALE_AFTER,
    IntegrityError,
    MirrorError,
    NotFound,
    Progress,
    RemoteObject,
)
from ckptd.throttle import Throttle

_PART = 64 << 20
_MAX_PARTS = 10_000
_READ = 8 << 20


def part_size_for(size: int, chunk: int = _PART) -> int:
    """The part size boto3 uses for a file of `size` bytes (it doubles the chunk past 10,000 parts)."""
    while math.ceil(size / chunk) > _MAX_PARTS:
        chunk *= 2
    return chunk


def composite_sha256(part_digests: list[bytes]) -> str:
    """S3's checksum of a multipart object: base64 SHA-256 of the parts' SHA-256s, then '-<parts>'."""
    return base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode() + f"-{len(part_digests)}"


def _drop_file(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        drop_cache(handle.fileno())


def _hex_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class _LocalDigests:
    """What the store should report for a file uploaded in parts of `part` bytes: its SHA-256, the SHA-256 and
    MD5 of each part; read on its own thread while the upload runs, just behind it (`sent`), so that it finds
    the pages the upload read in the page cache, then drops them (fsutil.drop_cache: an upload does not evict
    the training job's dataset)."""

    def __init__(self, part: int) -> None:
        self.part = part
        self.whole = hashlib.sha256()
        self.part_sha: list[bytes] = []
        self.part_md5: list[bytes] = []
        self.failed = ""
        self._sent = 0
        self._over = False
        self._progress = threading.Condition()

    def sent(self, count: int) -> None:
        """The upload sent `count` bytes more (boto3's callback)."""
        with self._progress:
            self._sent += count
            self._progress.notify_all()

    def over(self) -> None:
        """The upload ended (done or failed): read the rest at once."""
        with self._progress:
            self._over = True
            self._progress.notify_all()

    def _behind(self, upto: int) -> None:
        with self._progress:
            self._progress.wait_for(lambda: self._over or self._sent >= upto)

    def read(self, source: Path) -> None:
        try:
            with open(source, "rb") as handle:
                while True:
                    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
                    left = self.part
                    while left:
                        at = handle.tell()
                        self._behind(at + min(_READ, left))
                        piece = handle.read(min(_READ, left))
                        if not piece:
                            break
                        drop_cache(handle.fileno(), at, len(piece))
                        sha.update(piece)
                        md5.update(piece)
                        self.whole.update(piece)
                        left -= len(piece)
                    if left == self.part and self.part_sha:
                        return
                    self.part_sha.append(sha.digest())
                    self.part_md5.append(md5.digest())
                    if left:
                        return
        except OSError as exc:
            self.failed = str(exc)

    def etag(self, multipart: bool) -> str:
        """The ETag S3 computes: the MD5 hex of a single PUT, or the MD5 of the parts' MD5s and "-<parts>"."""
        if not multipart:
            return self.part_md5[0].hex()
        joined = hashlib.md5(b"".join(self.part_md5), usedforsecurity=False).hexdigest()
        return f"{joined}-{len(self.part_md5)}"


class S3Target:
    """Mirror target in an S3 bucket, under a prefix."""

    def __init__(self, name: str, settings: Any, *, node: str = "") -> None:
        self.name = name
        self.url = str(settings.url)
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, "/".join(p for p in (prefix.strip("/"), node) if p)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.checksum = str(getattr(settings, "checksum", "sha256"))
        self.proof = str(getattr(settings, "proof", "auto"))
        timeout = float(getattr(settings, "timeout", 20.0))
        config = BotoConfig(
            retries={"max_attempts": int(getattr(settings, "attempts", 2)), "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=getattr(settings, "endpoint_url", "") or None,
            region_name=getattr(settings, "region", "") or None,
            config=config,
        )
        self.transfer = TransferConfig(
            multipart_threshold=_PART, multipart_chunksize=_PART, max_concurrency=4, use_threads=True
        )
        self._throttle = Throttle(float(getattr(settings, "max_bandwidth", 0) or 0))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, key: str, exc: Exception) -> MirrorError:
        if isinstance(exc, NoCredentialsError):
            return MirrorError(
                f"{self.name}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
                " AWS_PROFILE, or use an instance role (never config.toml)"
            )
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFound(f"{self.name}:{key} does not exist")
            return MirrorError(f"{self.name}:{key}: {code or 'error'}: {exc}")
        return MirrorError(f"{self.name}:{key}: {exc}")

    def put_file(self, key: str, source: Path, *, sha256: str, progress: Progress | None = None) -> None:
        """Upload, then prove the object against `sha256` (see the module and the protocol in ckptd.mirrors)."""
        try:  # Fix: a checkpoint deleted before its copy (save_top_k) fails the copy; FileNotFoundError escaped
            size = source.stat().st_size
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        local = _LocalDigests(part_size_for(size, self.transfer.multipart_chunksize))
        hasher = threading.Thread(target=local.read, args=(source,), daemon=True)
        hasher.start()  # the local digests, computed while the upload reads the same pages

        def callback(moved: int) -> None:
            local.sent(moved)
            self._throttle(moved)
            if progress is not None:
                progress(moved)

        extra = {"ChecksumAlgorithm": "SHA256"} if self.checksum == "sha256" else {}
        try:
            self.client.upload_file(
                str(source), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer, Callback=callback
            )
        # Fix: upload_file wraps the store's refusals (wrong credentials, no such bucket, access denied) in
        # boto3's S3UploadFailedError, which is no ClientError: it escaped mirror_pass, so the copy was never
        # marked failed (no backoff, no last_error in `ckptd status`) and `ckptd mirror` crashed.
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            raise self._fail(key, exc) from exc
        finally:
            local.over()
            hasher.join()
            _drop_file(source)  # what the upload read and the digests did not find in the cache
        multipart = size >= self.transfer.multipart_threshold
        if local.failed or local.whole.hexdigest() != sha256:
            why = local.failed or "the local file changed since it was verified"
            self.delete(key)
            raise IntegrityError(f"{self.name}:{key}: not copied as verified ({why}); tried again later")
        if not self._proved(key, sha256, local, multipart):
            self.delete(key)
            raise IntegrityError(f"{self.name}:{key}: stored object does not match sha256 {sha256}")

    def _proved(self, key: str, sha256: str, local: _LocalDigests, multipart: bool) -> bool:
        """True when the stored object is proved to hold the bytes whose SHA-256 is `sha256` (see `proof`)."""
        if self.proof == "read-back":
            return self.sha256(key) == sha256
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc
        reported = head.get("ChecksumSHA256")
        # Real S3 appends "-<parts>" to a composite checksum; some compatible stores do not.
        expected = composite_sha256(local.part_sha) if multipart else _hex_to_b64(sha256)
        if reported and str(reported).split("-")[0] != expected.split("-")[0]:
            return False  # a store that checked disagrees: nothing to prove further
        if self.proof == "checksum":
            return bool(reported) or self.sha256(key) == sha256
        if str(head.get("ETag", "")).strip('"') == local.etag(multipart):
            return True  # the store's own MD5 of what it received
        return self.sha256(key) == sha256  # not an MD5 (SSE-KMS...) or bytes changed in transit: the bytes decide

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object (one PUT is atomic), sent with its MD5 for the store to check, and proved by the
        ETag the store answers with (or, where that is no MD5, by reading it back)."""
        md5 = hashlib.md5(data, usedforsecurity=False)
        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"} if self.checksum == "sha256" else {}
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentMD5=base64.b64encode(md5.digest()).decode(),
                **extra,
            )  # fmt: skip
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc
        if str(answer.get("ETag", "")).strip('"') != md5.hexdigest() and self.get_bytes(key) != data:
            self.delete(key)
            raise IntegrityError(f"{self.name}:{key}: the stored object does not hold the bytes sent")

    def read_into(self, key: str, out: int, progress: Progress | None = None) -> None:
        """Download into the open file `out` (parts written in place; see the protocol)."""
        try:
            with open(out, "wb", closefd=False) as handle:
                self.client.download_fileobj(self.bucket, self._key(key), handle, Config=self.transfer,
                                             Callback=progress)  # fmt: skip
        except (BotoCoreError, ClientError, Boto3Error) as exc:  # Fix: download may raise boto3's own errors too
            raise self._fail(key, exc) from exc
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        """Read a small object (at most SMALL_OBJECT_MAX bytes)."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if int(answer.get("ContentLength", 0)) > SMALL_OBJECT_MAX:
                answer["Body"].close()
                raise MirrorError(f"{self.name}:{key} is over {SMALL_OBJECT_MAX} bytes; not a ckptd index or sidecar")
            return bytes(answer["Body"].read())
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc

    def sha256(self, key: str) -> str:
        """Stream the object back and hash it."""
        digest = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for piece in body.iter_chunks(_READ):
                digest.update(piece)
                self._throttle(len(piece))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc
        return digest.hexdigest()

    def stat(self, key: str) -> RemoteObject | None:
        """Size of an object, or None."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            error = self._fail(key, exc)
            if isinstance(error, NotFound):
                return None
            raise error from exc
        except BotoCoreError as exc:
            raise self._fail(key, exc) from exc
        return RemoteObject(key, int(head["ContentLength"]))

    def delete(self, key: str) -> None:
        """Delete; S3 answers a missing key with success."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under a prefix, sorted."""
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    name = str(item["Key"])
                    keys.append(name[len(self.prefix) + 1 :] if self.prefix else name)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(prefix, exc) from exc
        return iter(sorted(keys))

    def sweep(self, idle_for: float = STALE_AFTER) -> builtins.list[str]:
        """Abort the incomplete multipart uploads under the target's prefix that have been idle for `idle_for`
        seconds: started that long ago and no part added since (see the protocol). An upload still running, here
        or on another machine, adds a part every few seconds to minutes, so it is left alone."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_for)
        under = self.prefix + "/" if self.prefix else ""
        aborted: builtins.list[str] = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=under)
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                key, upload_id = str(upload["Key"]), str(upload["UploadId"])
                if upload["Initiated"] > cutoff or self._last_part(key, upload_id) > cutoff:
                    continue
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                        continue  # it completed, or was aborted, meanwhile
                    raise
                aborted.append(f"{self.name}:{key[len(under) :]} (incomplete upload {upload_id[:16]})")
        except (BotoCoreError, ClientError) as exc:
            raise self._fail("(multipart uploads)", exc) from exc
        return aborted

    def _last_part(self, key: str, upload_id: str) -> datetime:
        """When the newest part of an upload was added (the epoch when it has none)."""
        newest = datetime.fromtimestamp(0, UTC)
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
        for part in (p for page in pages for p in page.get("Parts", [])):
            newest = max(newest, part["LastModified"])
        return newest
