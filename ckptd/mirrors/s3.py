"""S3 and S3-compatible stores (MinIO, Ceph RGW...) as a mirror target; the only boto3 import.

Credentials come from the standard AWS chain (environment, profile, instance role), never from config.toml.
Uploads go through boto3's TransferConfig (multipart, concurrent parts); S3 shows no object until the
upload completes. With `checksum = "sha256"` the store is asked to check each part's SHA-256, and the copy
is proved against the sidecar through the checksum S3 reports: for a multipart object that is the SHA-256
of the parts' SHA-256s, so the same is computed locally while the upload runs. A store that reports no
checksum (or `checksum = "off"`, for stores that reject checksum headers) is proved by a read-back.
botocore's default CRC32 request checksums are turned off: they break some S3-compatible stores.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ckptd.fsutil import fsync_dir, temp_path_for
from ckptd.mirrors import IntegrityError, MirrorError, NotFound, Progress, RemoteObject
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


def _hex_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class S3Target:
    """Mirror target in an S3 bucket, under a prefix."""

    def __init__(self, name: str, settings: Any) -> None:
        self.name = name
        self.url = str(settings.url)
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.checksum = str(getattr(settings, "checksum", "sha256"))
        config = BotoConfig(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
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
        """Upload, then prove the object against `sha256` (see the protocol in ckptd.mirrors)."""
        try:  # Fix: a checkpoint deleted before its copy (save_top_k) fails the copy; FileNotFoundError escaped
            size = source.stat().st_size
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        multipart = size >= self.transfer.multipart_threshold
        parts: list[bytes] = []
        whole = hashlib.sha256()
        hasher = threading.Thread(target=self._hash_parts, args=(source, size, parts, whole), daemon=True)
        if multipart and self.checksum == "sha256":
            hasher.start()  # the local part digests, computed while the upload reads the same pages

        def callback(moved: int) -> None:
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
            if hasher.is_alive():
                hasher.join()
        reported = self._reported_checksum(key)
        if reported is None:
            actual = self.sha256(key)  # the store reports nothing: read it back
            ok = actual == sha256
        elif multipart and parts:
            # Real S3 appends "-<parts>" to a composite checksum; some compatible stores do not.
            expected = composite_sha256(parts).split("-")[0]
            ok = reported.split("-")[0] == expected and whole.hexdigest() == sha256
        else:
            ok = reported == _hex_to_b64(sha256)
        if not ok:
            self.delete(key)
            raise IntegrityError(f"{self.name}:{key}: stored object does not match sha256 {sha256}")

    def _hash_parts(self, source: Path, size: int, parts: list[bytes], whole: Any) -> None:
        part = part_size_for(size, self.transfer.multipart_chunksize)
        with open(source, "rb") as handle:
            while True:
                digest = hashlib.sha256()
                left = part
                while left:
                    piece = handle.read(min(_READ, left))
                    if not piece:
                        break
                    digest.update(piece)
                    whole.update(piece)
                    left -= len(piece)
                if left == part:
                    return
                parts.append(digest.digest())

    def _reported_checksum(self, key: str) -> str | None:
        if self.checksum != "sha256":
            return None
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc
        value = head.get("ChecksumSHA256")
        return str(value) if value else None

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object (one PUT is atomic)."""
        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"} if self.checksum == "sha256" else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from exc

    def get_file(self, key: str, destination: Path, progress: Progress | None = None) -> None:
        """Download to a temp file beside `destination`, fsync, rename."""
        temp = temp_path_for(destination)
        try:
            self.client.download_file(self.bucket, self._key(key), str(temp), Config=self.transfer, Callback=progress)
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, destination)
            fsync_dir(destination.parent)
        except (BotoCoreError, ClientError, Boto3Error) as exc:  # Fix: download_file may raise boto3's own errors too
            raise self._fail(key, exc) from exc
        except OSError as exc:
            raise MirrorError(f"{self.name}:{key}: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        """Read a small object."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())
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
