"""`mocoserve serve` soaked under mixed, partly hostile load for a bounded time, loopback only.

One server (`serve --index --no-ui`) gets, at once and for `--seconds` (default 120):
  embed     clients posting one JPEG each to /v1/embed
  search    clients searching by image, by vector and by id (k=10)
  large     a client posting a 13,300 x 13,300 solid-colour PNG (544 KB, 177 MP)
  idle      sockets that connect and send nothing (reopened when the server closes them)
  slow      sockets sending one header line every 2 s (slowloris)
  health    /healthz and /readyz every 0.25 s, as an orchestrator's probes would
  writer    `mocoserve embed` in another process, adding and removing images in rounds
and the script prints, per kind: requests, failures (any answer but the expected one, or a
transport error), p99 latency; how often the server closed idle and slow sockets; the
server's peak RSS (VmHWM); the index versions served. Every loop stops at the deadline.
Usage: python benchmarks/soak.py [--seconds 120] [--idle 100] [--slow 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed_throughput import make_jpegs
from benchmarks.export_throughput import make_package
from benchmarks.serve_load import free_port


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (13_300, 13_300), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


ATTACKER_SOCKETS = 24  # per address: under serve's --max-connections-per-client (64)


def attacker(i: int) -> str:
    return f"127.0.0.{2 + i // ATTACKER_SOCKETS}"


class Tally:
    """Requests, failures and latencies per kind of client."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, kind: str, seconds: float, failure: str | None) -> None:
        self.latencies[kind].append(seconds)
        if failure is not None:
            self.failures[kind].append(failure)

    def summary(self) -> dict:
        out = {}
        for kind, values in sorted(self.latencies.items()):
            values = sorted(values)
            out[kind] = {
                "requests": len(values),
                "failures": len(self.failures[kind]),
                "p99_ms": 1000 * values[min(len(values) - 1, int(0.99 * len(values)))],
                "max_ms": 1000 * values[-1],
                "first_failures": sorted(set(self.failures[kind]))[:3],
            }
        return out


async def timed(tally: Tally, kind: str, call, ok) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        reply = await call()
    except httpx.HTTPError as e:
        tally.add(kind, time.perf_counter() - started, f"{type(e).__name__}")
        return None
    failure = None if ok(reply) else f"{reply.status_code} {reply.text[:120]}"
    tally.add(kind, time.perf_counter() - started, failure)
    return reply


async def embed_client(http, url, payloads, tally, deadline, seed) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        data = rng.choice(payloads)
        headers = {"Content-Type": "image/jpeg"}
        await timed(
            tally,
            "embed",
            lambda data=data, headers=headers: http.post(
                f"{url}/v1/embed", content=data, headers=headers
            ),
            lambda r: r.status_code == 200 and r.json()["errors"] == [None],
        )


async def search_client(http, url, payloads, tally, deadline, seed, dim) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        how = rng.choice(("image", "vector", "id"))
        if how == "image":
            call = lambda: http.post(  # noqa: E731
                f"{url}/v1/search",
                content=rng.choice(payloads),
                headers={"Content-Type": "image/jpeg"},
                params={"k": 10},
            )
        elif how == "vector":
            vector = np.random.default_rng(rng.randrange(2**32)).normal(size=dim).tolist()
            call = lambda vector=vector: http.post(  # noqa: E731
                f"{url}/v1/search", json={"vectors": [vector], "k": 10}
            )
        else:  # an id the index has now (the writer adds and removes between calls)
            # an id removed between the two calls is a 404: not a failure of the service
            reply = await http.post(f"{url}/v1/search", json={"vectors": [[1.0] * dim], "k": 1})
            hits = reply.json()["results"][0]["hits"] if reply.status_code == 200 else []
            if not hits:
                continue
            own = hits[0]["id"]
            call = lambda own=own: http.post(  # noqa: E731
                f"{url}/v1/search", json={"ids": [own], "k": 10}
            )
        by_id = how == "id"
        await timed(
            tally,
            f"search_{how}",
            call,
            lambda r, by_id=by_id: (
                (r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 10)
                or (by_id and r.status_code == 404)
            ),
        )


async def large_client(http, url, png, tally, deadline) -> None:
    """A decompression-bomb-sized image: refused (4xx or a per-image error), never a stall."""
    while time.monotonic() < deadline:
        await timed(
            tally,
            "large_image",
            lambda: http.post(
                f"{url}/v1/embed", content=png, headers={"Content-Type": "image/png"}
            ),
            lambda r: (
                (400 <= r.status_code < 500)
                or (r.status_code == 200 and r.json()["errors"][0] is not None)
            ),
        )


async def health_client(http, url, tally, deadline) -> None:
    while time.monotonic() < deadline:
        for route in ("/healthz", "/readyz"):
            await timed(
                tally,
                route.strip("/"),
                lambda route=route: http.get(url + route),
                lambda r: r.is_success,
            )
        await asyncio.sleep(0.25)


async def idle_socket(port, closed, deadline, source) -> None:
    """Connect, send nothing; when the server closes it, count it and connect again."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            left = deadline - time.monotonic()
            if await asyncio.wait_for(reader.read(1024), timeout=max(0.01, left)) is not None:
                closed["idle"] += 1  # EOF or an answer: the server let go of it
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()


async def slow_socket(port, closed, deadline, source) -> None:
    """Slowloris: a request line, then one header line every 2 s, never the blank line."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            n = 0
            while time.monotonic() < deadline:
                await asyncio.sleep(2)
                writer.write(b"X-Slow-%d: 1\r\n" % n)
                await writer.drain()
                n += 1
                if reader.at_eof():
                    break
            if reader.at_eof() or time.monotonic() < deadline:
                closed["slow"] += 1
        except OSError:
            closed["slow"] += 1  # reset by the server
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def writer_rounds(images: Path, extra: Path, index: Path, deadline: float) -> dict:
    """`mocoserve embed` in rounds: add a batch of images, then remove them, until the deadline."""
    rounds, failures = 0, []
    spare = sorted(extra.rglob("*.jpg"))
    while time.monotonic() < deadline - 5:
        target = images / "class_added"
        if target.exists():
            shutil.rmtree(target)  # this round removes what the last one added
        else:
            target.mkdir()
            for f in spare:
                shutil.copy(f, target / f.name)
        done = subprocess.run(
            [sys.executable, "-m", "mocoserve", "embed", str(images), "--index", str(index)]
            + ["--quiet", "--workers", "0"],
            capture_output=True,
            text=True,
            timeout=max(5, deadline - time.monotonic() + 30),
        )
        rounds += 1
        if done.returncode != 0:
            failures.append(done.stderr.strip().splitlines()[-1:])
    return {"rounds": rounds, "failures": failures}


async def soak(url: str, port: int, payloads, png, args, tally, closed) -> None:
    deadline = time.monotonic() + args.seconds
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        dim = (await http.get(f"{url}/v1/info")).json()["model"]["dim"]
        jobs = [embed_client(http, url, payloads, tally, deadline, i) for i in range(args.embeds)]
        jobs += [
            search_client(http, url, payloads, tally, deadline, i, dim)
            for i in range(args.searches)
        ]
        jobs += [
            large_client(http, url, png, tally, deadline),
            health_client(http, url, tally, deadline),
        ]
        # the flood comes from other loopback addresses (127.0.0.2 on), ATTACKER_SOCKETS
        # each; the clients above from 127.0.0.1, as an orchestrator's probes would
        jobs += [idle_socket(port, closed, deadline, attacker(i)) for i in range(args.idle)]
        jobs += [
            slow_socket(port, closed, deadline, attacker(args.idle + i)) for i in range(args.slow)
        ]
        await asyncio.gather(*jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--embeds", type=int, default=4, help="embed clients")
    parser.add_argument("--searches", type=int, default=4, help="search clients")
    parser.add_argument("--idle", type=int, default=100, help="idle sockets")
    parser.add_argument("--slow", type=int, default=20, help="slowloris sockets")
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_jpegs(tmp / "images", 48)
        extra = make_jpegs(tmp / "extra", 16, seed=1)
        _, pkg = make_package(args.arch, tmp)
        index = tmp / "out.faiss"
        subprocess.run(
            [sys.executable, "-m", "mocoserve", "embed", str(images), "--index", str(index)]
            + ["--model", str(pkg), "--quiet"],
            check=True,
        )
        payloads = [f.read_bytes() for f in sorted(images.rglob("*.jpg"))]
        png = huge_png()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mocoserve", "serve", "--index", str(index), "--no-ui"]
        server = subprocess.Popen(
            cmd + ["--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            started = time.monotonic()
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() - started > 180:
                    raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.3)
            rss_before = peak_rss_mb(server.pid)
            tally, closed = Tally(), defaultdict(int)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                writer = pool.submit(
                    writer_rounds, images, extra, index, time.monotonic() + args.seconds
                )
                asyncio.run(soak(url, port, payloads, png, args, tally, closed))
                rounds = writer.result()
            info = httpx.get(f"{url}/v1/info", timeout=10).json()
            result = {
                "seconds": args.seconds,
                "cpu_count": os.cpu_count(),
                "clients": {k: getattr(args, k) for k in ("embeds", "searches", "idle", "slow")},
                "by_kind": tally.summary(),
                "requests": sum(len(v) for v in tally.latencies.values()),
                "failures": sum(len(v) for v in tally.failures.values()),
                "sockets_closed_by_server": dict(closed),
                "writer": rounds,
                "index_version_at_end": info["index"]["version"],
                "reload_error": info["index"]["reload_error"],
                "server_rss_mb_after_start": rss_before,
                "server_peak_rss_mb": peak_rss_mb(server.pid),
            }
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    print(json.dumps(result, indent=1, default=lambda v: round(v, 1)))


if __name__ == "__main__":
    main()
