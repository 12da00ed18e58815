"""The benchmarks' load generator against a real HTTP server on 127.0.0.1 (stdlib ``http.server``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from serving.loadgen import percentile, run_load

DELAY_S = 0.1  # every answer takes this long, so latencies and concurrency are measurable


@dataclass
class Seen:
    """What the server received: request indices and the client port (one per keep-alive connection)."""

    indices: list[int] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture()
def server() -> Iterator[tuple[str, Seen]]:
    """``GET /ok/<i>`` answers 200 and ``GET /fail/<i>`` 503, each after DELAY_S; keep-alive on."""
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection

        def do_GET(self) -> None:
            kind, index = self.path.strip("/").split("/")
            with seen.lock:
                seen.indices.append(int(index))
                seen.ports.add(self.client_address[1])
            time.sleep(DELAY_S)
            body = kind.encode()
            self.send_response(200 if kind == "ok" else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)  # rank 2.85: 3 + 0.85 * (4 - 3)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_run_load_sends_every_index_once_and_times_only_the_measured_ones(server: tuple[str, Seen]) -> None:
    url, seen = server
    stats = run_load(lambda client, i: client.get(f"{url}/ok/{i}"), requests=8, concurrency=4, warmup=4)
    assert sorted(seen.indices) == list(range(12))  # 4 warm-up + 8 measured, each index once
    assert set(seen.indices[:4]) == {0, 1, 2, 3}  # the warm-up finishes before the measured requests start
    assert len(seen.ports) == 4  # one client (one keep-alive connection) per thread
    assert stats["concurrency"] == 4.0 and stats["requests"] == 8.0 and stats["errors"] == 0.0
    assert DELAY_S * 1e3 <= stats["p50_ms"] <= stats["p95_ms"]
    # 8 requests of 0.1 s on 4 threads: two rounds, far below the 0.8 s they take one after another.
    assert 2 * DELAY_S <= stats["wall_s"] < 6 * DELAY_S
    assert stats["throughput_rps"] == pytest.approx(8 / stats["wall_s"])


def test_run_load_counts_errors_and_excludes_them_from_latency_and_throughput(server: tuple[str, Seen]) -> None:
    url, _ = server
    stats = run_load(lambda client, i: client.get(f"{url}/{'fail' if i % 2 else 'ok'}/{i}"),
                     requests=6, concurrency=3)
    assert stats["requests"] == 6.0 and stats["errors"] == 3.0
    assert stats["throughput_rps"] == pytest.approx(3 / stats["wall_s"])


def test_run_load_fails_clearly_when_nothing_succeeds(server: tuple[str, Seen]) -> None:
    url, _ = server
    with pytest.raises(RuntimeError, match=r"all 2 probe requests failed \(statuses \[503\]\)"):
        run_load(lambda client, i: client.get(f"{url}/fail/{i}"), requests=2, concurrency=2, what="probe requests")


def test_run_load_propagates_connection_errors_and_rejects_bad_sizes() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.raises(httpx.ConnectError):
        run_load(lambda client, i: client.get(closed), requests=1, concurrency=1, timeout_s=5.0)
    with pytest.raises(ValueError, match="requests=0"):
        run_load(lambda client, i: client.get(closed), requests=0, concurrency=1)
