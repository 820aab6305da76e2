"""/metrics as Prometheus asks for it: the plain text format, never gzipped (both only cost CPU on loopback)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.exposition import ThreadingWSGIServer

from services.common import metrics as m

# What Prometheus 2.x sends with every scrape.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.fixture
def server() -> Iterator[ThreadingWSGIServer]:
    srv = m.serve_metrics(0)  # port 0: any free loopback port
    yield srv
    srv.shutdown()
    srv.server_close()


def scrape(srv: ThreadingWSGIServer, path: str = "/metrics") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.server_port}{path}",
                                 headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def test_prometheus_gets_plain_text_uncompressed(server: ThreadingWSGIServer) -> None:
    m.record_produce_error("fsi.exposition-test")
    status, headers, body = scrape(server)
    assert status == 200
    assert headers["content-type"].startswith("text/plain;")
    assert "content-encoding" not in headers
    text = body.decode()
    assert 'xs_kafka_produce_errors_total{topic="fsi.exposition-test"} 1.0\n' in text
    assert "# EOF" not in text  # OpenMetrics ends with it; the text format does not


def test_any_path_answers_for_the_readiness_probe(server: ThreadingWSGIServer) -> None:
    status, _, body = scrape(server, "/")
    assert status == 200 and b"# TYPE xs_requests_total counter" in body
