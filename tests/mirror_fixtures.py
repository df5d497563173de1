"""A real S3 endpoint for the mirror tests: moto's standalone server on a loopback port, in this process.

conftest.py registers these fixtures as a plugin (once for the session,
so the server starts once however many modules use it; tests/ must be on sys.path). `MotoS3` wraps
`moto.server.ThreadedMotoServer` so that `stop()` is a real outage: the listening socket is closed and every
open (keep-alive) connection is cut, so clients see refused or reset connections until `start()` opens the
same port again. moto keeps its buckets in this process, so they survive a stop and start, like a store that
goes down and comes back.

Credentials are dummies in the environment (the AWS chain), never in a config file; subprocesses (`ckptd run`,
`ckptd restore`) inherit them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "ckptd-test-key",
    "AWS_SECRET_ACCESS_KEY": "ckptd-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance role on a test machine
    "AWS_CONFIG_FILE": os.devnull,  # the developer's ~/.aws must not leak in
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_bucket_numbers = itertools.count(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoS3:
    """moto's S3 server on 127.0.0.1:`port`; stop() takes it down hard, start() brings it back on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on the port (again)."""
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request drowns the test output
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        wsgi: Any = server._server
        accept = wsgi.get_request

        def get_request() -> tuple[socket.socket, Any]:  # remember each connection, to cut it on stop()
            connection, address = accept()
            with self._lock:
                self._connections.add(connection)
            return connection, address

        wsgi.get_request = get_request
        self._server = server

    def stop(self) -> None:
        """Go down: stop accepting, close the listening socket, reset every open connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        wsgi: Any = server._server
        wsgi.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def running(self) -> bool:
        """True while the server accepts connections."""
        return self._server is not None

    def client(self) -> Any:
        """A plain boto3 S3 client for this endpoint (what tests use to look at or tamper with objects)."""
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@dataclass(frozen=True)
class Bucket:
    """A fresh bucket on the moto server."""

    name: str
    server: MotoS3

    @property
    def endpoint(self) -> str:
        """The endpoint_url a `[mirror.NAME]` section names."""
        return self.server.endpoint

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(str(item["Key"]) for page in pages for item in page.get("Contents", []))


def new_bucket(server: MotoS3) -> Bucket:
    """Create a bucket with a valid, unused name (ckptd-test-<n>)."""
    name = f"ckptd-test-{os.getpid()}-{next(_bucket_numbers)}"
    server.client().create_bucket(Bucket=name)
    return Bucket(name, server)


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Dummy AWS credentials and region in the environment for the whole session."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in AWS_ENV.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def moto_s3(aws_env: None) -> Iterator[MotoS3]:
    """moto's standalone S3 server on a free loopback port, started once for the session."""
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> Bucket:
    """A fresh bucket on the session's moto server."""
    if not moto_s3.running:  # a test that took the server down and failed before bringing it back
        moto_s3.start()
    return new_bucket(moto_s3)


class FlippingProxy:
    """An HTTP proxy in front of the moto server that flips one byte in the body of every PUT whose path ends
    with `suffix` (an object upload or an upload part), and passes everything else through untouched.

    It stands for a link that corrupts data in transit. moto, like stores that do not validate
    x-amz-checksum-sha256, stores the flipped bytes and reports back the checksum the client sent.
    """

    def __init__(self, upstream: MotoS3, suffix: str = ".ckpt") -> None:
        import http.client
        import http.server
        import socketserver

        self.flipped = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                return

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                if self.command == "PUT" and path.endswith(suffix) and body:
                    flipped = bytearray(body)
                    flipped[len(flipped) // 2] ^= 0x01
                    body = bytes(flipped)
                    proxy.flipped += 1
                connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body if length else None, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                head = self.command == "HEAD"  # a HEAD answer keeps the object's own Content-Length
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection") and (
                        head or key.lower() != "content-length"
                    ):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def flipping_proxy(moto_s3: MotoS3) -> Iterator[FlippingProxy]:
    """A proxy to the session's moto server that corrupts every uploaded *.ckpt body in transit."""
    proxy = FlippingProxy(moto_s3)
    yield proxy
    proxy.close()
