"""`mocoserve serve` under hostile load: idle and slow connections, floods from one address,
answers too large to build. A real server (uvicorn in a subprocess) on loopback; the flood
comes from other loopback addresses (127.0.0.2, ...), the probes from 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.items import NewItem
from mocoserve.index.writer import IndexWriter
from tests.imagegen import class_image
from tests.test_service import Server

DIM, ITEMS = 512, 2000
IDLE, HEADER, BODY, PER_CLIENT = 1.0, 1.5, 2.0, 6
SLACK = 2.0  # seconds a close may come after its deadline on a busy 2-core machine


def make_vector_index(index: Path, n: int, model_dir: Path) -> None:
    """An index of n seeded unit vectors written the way embed writes one (no images)."""
    facts = ModelFacts.of_package(model_dir)
    vectors = np.random.default_rng(0).standard_normal((n, facts.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with IndexWriter(index) as writer:
        writer.prepare(facts, shards=2)
        writer.own(range(2))
        items = [
            NewItem(f"/v/{i:05d}.png", None, "0", 1, 1, 8, 8, v) for i, v in enumerate(vectors)
        ]
        writer.commit(items, [])
        writer.build()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir) -> Iterator[Server]:
    index = tmp_path_factory.mktemp("limits") / "vectors.faiss"
    make_vector_index(index, ITEMS, model_dir)
    s = Server(
        "--index", str(index), "--model", str(model_dir), "--no-ui",
        "--max-connections", "8", "--max-connections-per-client", str(PER_CLIENT),
        "--idle-timeout", str(IDLE), "--header-timeout", str(HEADER),
        "--body-timeout", str(BODY),
    )  # fmt: skip
    s.wait_ready()
    yield s
    s.stop()
    assert "Traceback" not in s.err, s.err


def connect(server: Server, source: str) -> socket.socket:
    """A TCP connection to the server from this loopback address."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def closed_by_server(sock: socket.socket, deadline: float) -> bytes:
    """What the server sent before it closed the connection; fails if it is still open at
    `deadline` (time.monotonic())."""
    received = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError("the server kept the connection open past its deadline") from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def trickle(sock: socket.socket, head: bytes, pieces: Iterator[bytes], every: float) -> None:
    """Send `head`, then one piece every `every` seconds until the server closes."""
    try:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(every)
            sock.sendall(piece)
    except OSError:
        pass  # closed by the server: what the test waits for


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    class_image(0, 1, size=40).save(buffer, format="PNG")
    return buffer.getvalue()


def test_idle_and_slow_connections_lock_no_one_out_and_are_closed(server):
    flood_started = time.monotonic()
    # 24 idle sockets, three times --max-connections, from four addresses (6 each)
    idle = [connect(server, f"127.0.0.{2 + i // PER_CLIENT}") for i in range(24)]
    # headers one line every 0.3 s (each line would reset a per-read timeout), a body at
    # one byte every 0.2 s
    slow_head = connect(server, "127.0.0.6")
    head_lines = (b"X-Slow-%d: 1\r\n" % i for i in range(1000))
    slow_body = connect(server, "127.0.0.7")
    body_head = (
        b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    for sock, head, pieces in (
        (slow_head, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\n", head_lines),
        (slow_body, body_head, (b"x" for _ in range(100_000))),
    ):
        threading.Thread(target=trickle, args=(sock, head, pieces, 0.25), daemon=True).start()
    time.sleep(0.3)
    # everyone else is served, at once
    started = time.monotonic()
    for path in ("/healthz", "/readyz"):
        answer = httpx.get(f"{server.url}{path}", timeout=5)
        assert answer.status_code == 200, answer.text
    embedded = httpx.post(
        f"{server.url}/v1/embed",
        content=png_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=5,
    )
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["embeddings"][0]) == DIM
    assert time.monotonic() - started < 2.0
    # and each held socket is closed by the server at its own deadline
    for sock in idle:
        assert closed_by_server(sock, flood_started + IDLE + SLACK) == b""
    for sock, limit, what in ((slow_head, HEADER, "headers"), (slow_body, BODY, "body")):
        answer = closed_by_server(sock, flood_started + limit + SLACK)
        if answer:  # a 408 unless the kernel reset the connection under the unread bytes
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "timeout" and what in body["error"]["message"]
    for sock in [*idle, slow_head, slow_body]:
        sock.close()


def test_connections_beyond_the_per_client_limit_are_refused_at_once(server):
    held = [connect(server, "127.0.0.8") for _ in range(PER_CLIENT)]
    one_more = connect(server, "127.0.0.8")
    refused = closed_by_server(one_more, time.monotonic() + 0.5)  # not at the idle timeout
    assert refused.startswith(b"HTTP/1.1 429"), refused[:200]
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
    # other addresses are not counted against it
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    # a closed connection frees its place
    held.pop().close()
    time.sleep(0.2)
    again = connect(server, "127.0.0.8")
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert closed_by_server(again, time.monotonic() + 3).startswith(b"HTTP/1.1 200")
    for sock in [*held, one_more, again]:
        sock.close()


def test_requests_beyond_max_connections_are_a_json_503_but_health_answers(server):
    # eight requests in flight (--max-connections 8): bodies that never come
    head = (
        b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    stalled = [connect(server, f"127.0.0.{10 + i % 2}") for i in range(8)]
    for sock in stalled:
        sock.sendall(head)
    time.sleep(0.3)
    busy = httpx.get(f"{server.url}/v1/info", timeout=5)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "busy"
    for path in ("/healthz", "/readyz"):
        assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200
    # the stalled bodies time out, and their places are free again
    for sock in stalled:
        closed_by_server(sock, time.monotonic() + BODY + SLACK)
        sock.close()
    assert httpx.get(f"{server.url}/v1/info", timeout=5).status_code == 200


def queries(n: int) -> list[list[float]]:
    return np.random.default_rng(n).standard_normal((n, DIM)).round(4).tolist()


def test_a_search_asking_for_too_many_hits_is_refused_with_a_json_422(server):
    url = f"{server.url}/v1/search"
    refused = httpx.post(url, json={"vectors": queries(11), "k": 1000}, timeout=30)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "too_many_hits" and "10000" in error["message"]
    allowed = httpx.post(url, json={"vectors": queries(10), "k": 1000}, timeout=30)
    assert allowed.status_code == 200, allowed.text
    results = allowed.json()["results"]
    assert [len(r["hits"]) for r in results] == [1000] * 10
    hit = results[0]["hits"][0]
    assert set(hit) == {"id", "score", "label", "width", "height", "url", "is_query"}
    assert hit["url"] == f"/v1/items/{hit['id']}/image" and -1 <= hit["score"] <= 1


def test_health_answers_quickly_while_large_searches_run(server):
    body = json.dumps({"vectors": queries(10), "k": 1000})
    done, failed, stop = [], [], threading.Event()

    def search_loop() -> None:
        # from another address than the probes: 127.0.0.1 may open only PER_CLIENT
        transport = httpx.HTTPTransport(local_address="127.0.0.9")
        with httpx.Client(transport=transport, timeout=60) as client:
            while not stop.is_set():
                answer = client.post(
                    f"{server.url}/v1/search",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                (done if answer.status_code == 200 else failed).append(answer.status_code)

    searchers = [threading.Thread(target=search_loop, daemon=True) for _ in range(6)]
    for t in searchers:
        t.start()
    time.sleep(1.0)  # every searcher has a request in flight
    waits = []
    with httpx.Client(timeout=10) as client:
        for _ in range(15):
            started = time.monotonic()
            assert client.get(f"{server.url}/healthz").status_code == 200
            waits.append(time.monotonic() - started)
            time.sleep(0.1)
    stop.set()
    for t in searchers:
        t.join(60)
    assert not failed and len(done) >= 6
    # loose bounds, a behaviour and not a benchmark: with the answers built on the event
    # loop, the median wait was ~0.7 s and the longest over 1.3 s; off it, ~0.02 and ~0.2
    median, longest = sorted(waits)[len(waits) // 2], max(waits)
    assert median < 0.25 and longest < 1.0, f"/healthz took {median:.2f} s, at most {longest:.2f} s"


@pytest.mark.parametrize(
    "option, value",
    [
        ("--idle-timeout", "0"),
        ("--header-timeout", "nan"),
        ("--body-timeout", "-1"),
        ("--body-timeout", "1e9"),
        ("--max-connections-per-client", "-1"),
    ],
)
def test_bad_limit_options_are_one_line_and_exit_2(model_dir, option, value):
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), option, value])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + option), result.output
