"""Fixtures for the rebuild tests: moto on 127.0.0.1, and a stand-in instance.

The promotion tests run against a real moto server; the instance side of a
smoke run is played by a thread that does what the booted image does: read
its user data, publish its run record with nightshift.agent's own code, and
terminate.  The retention tests use mock_aws in-process.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rebuild_support import Aws


@pytest.fixture
def endpoint(endpoint, monkeypatch):
    """A fresh moto; clients made without an endpoint (the agent's) go there too."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return endpoint


@pytest.fixture
def aws(endpoint) -> Aws:
    return Aws(endpoint)


class _Imds(BaseHTTPRequestHandler):
    """Just enough IMDSv2 for the agent's report: a token and the instance id."""

    documents: dict[str, bytes] = {}

    def do_PUT(self):  # noqa: N802 (http.server's naming)
        self._answer(b"token" if self.path == "/latest/api/token" else None)

    def do_GET(self):  # noqa: N802
        self._answer(self.documents.get(self.path))

    def _answer(self, body: bytes | None) -> None:
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    """An IMDS stand-in on 127.0.0.1; the test sets the documents it serves."""
    documents: dict[str, bytes] = {}
    handler = type("Imds", (_Imds,), {"documents": documents})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", documents
    server.shutdown()
    server.server_close()
