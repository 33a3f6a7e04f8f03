"""`mocoserve serve` under load, in one run: dynamic batching against batch 1 and the model alone.

32 concurrent clients (one async httpx client, loopback only) send one-image embed
requests for a fixed time to
  batched    mocoserve serve --max-batch 64
  unbatched  mocoserve serve --max-batch 1
and the figures are set against the exported model alone at its best batch size (ONNX
Runtime on pre-decoded tensors). Then searches/s by image: the service's /v1/search against
the Gradio app's API (`mocoserve app`) on the same index. The clients share the machine
with the server: on 2 cores that costs the server some of its throughput.
Usage: python benchmarks/serve_load.py [--seconds 20] [--clients 32] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed_throughput import make_jpegs
from benchmarks.export_throughput import make_package
from mocoserve import model as package_loader
from mocoserve.core.decode import decode_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_alone(pkg: Path, files: list[Path], seconds: float = 2.0) -> dict[int, float]:
    """img/s of the model alone (ONNX Runtime, pre-decoded tensors) at each batch size."""
    encoder = package_loader.load(pkg, backend="onnx", device="auto")
    pixels = [decode_file(str(p), encoder.resize, encoder.input_size).pixels for p in files]
    rates = {}
    for batch in (1, 4, 16, 32, 64):
        x = package_loader.to_input(np.stack([pixels[i % len(pixels)] for i in range(batch)]))
        encoder.embed(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            encoder.embed(x)
            n += batch
        rates[batch] = n / (time.perf_counter() - start)
    return rates


def start(cmd: list[str], url: str, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[3]} did not start: {proc.stderr.read().decode()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def load(url: str, route: str, payloads: list[bytes], clients: int, seconds: float, field):
    """`clients` loops posting one image each for `seconds`: requests/s, p50, p95, errors."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        n = i
        while time.monotonic() < deadline:
            data = payloads[n % len(payloads)]
            n += clients
            t = time.perf_counter()
            reply = await http.post(f"{url}{route}", **field(data))
            if reply.status_code == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        began = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.monotonic() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * pick(0.95),
        "errors": errors,
    }


def jpeg_body(data: bytes) -> dict:
    return {"content": data, "headers": {"Content-Type": "image/jpeg"}}


def search_body(data: bytes) -> dict:
    return {**jpeg_body(data), "params": {"k": 10}}


def mean_batch(metrics_text: str) -> float:
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics_text.splitlines()
        if line.startswith("mocoserve_batch_size_") and "{" not in line
    }
    return values["mocoserve_batch_size_sum"] / max(1, values["mocoserve_batch_size_count"])


def serve_run(index: Path, max_batch: int, payloads: list[bytes], args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mocoserve", "serve", "--index", str(index), "--no-ui"]
    cmd += ["--port", str(port), "--max-batch", str(max_batch), "--max-delay-ms", "5"]
    proc = start(cmd, url, "/readyz")
    try:
        embed = asyncio.run(load(url, "/v1/embed", payloads, args.clients, args.seconds, jpeg_body))
        embed["mean_batch"] = mean_batch(httpx.get(f"{url}/metrics").text)
        search = None
        if max_batch > 1:
            search = asyncio.run(
                load(url, "/v1/search", payloads, args.clients, args.seconds / 2, search_body)
            )
    finally:
        stop(proc)
    return {"embed": embed, "search": search}


def app_searches(index: Path, files: list[Path], args) -> dict:
    """Searches/s through the Gradio app's API (gradio_client), as the app's users call it."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mocoserve", "app", "--index", str(index), "--port", str(port)]
    proc = start(cmd, url, "/config")
    try:
        client = Client(url, verbose=False, download_files=False)
        deadline = time.monotonic() + args.seconds / 2
        latencies: list[float] = []

        def one(i: int) -> None:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                query = handle_file(str(files[i % len(files)]))
                client.predict(query, 10, "(any label)", api_name="/search")
                latencies.append(time.perf_counter() - t)

        began = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.clients)))
        elapsed = time.monotonic() - began
    finally:
        stop(proc)
    latencies.sort()
    return {"per_s": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_jpegs(tmp / "images", args.images)
        files = sorted(root.rglob("*.jpg"))
        _, pkg = make_package(args.arch, tmp)
        index = tmp / "out.faiss"
        subprocess.run(
            [sys.executable, "-m", "mocoserve", "embed", str(root), "--index", str(index)]
            + ["--model", str(pkg), "--quiet"],
            check=True,
        )
        payloads = [f.read_bytes() for f in files]
        rates = model_alone(pkg, files)
        best_batch = max(rates, key=rates.get)
        bound = rates[best_batch]
        batched = serve_run(index, 64, payloads, args)
        unbatched = serve_run(index, 1, payloads, args)
        app = app_searches(index, files, args)
    r = {
        "arch": args.arch,
        "clients": args.clients,
        "seconds": args.seconds,
        "cpu_count": os.cpu_count(),
        "model_alone_img_s": bound,
        "model_alone_best_batch": best_batch,
        "model_alone_img_s_by_batch": rates,
        "batching_gain_of_the_model_alone": bound / rates[1],
        "batched": batched["embed"],
        "unbatched": unbatched["embed"],
        "service_search_by_image": batched["search"],
        "app_search_by_image": app,
        "batched_vs_model_alone": batched["embed"]["per_s"] / bound,
        "batched_vs_unbatched": batched["embed"]["per_s"] / unbatched["embed"]["per_s"],
        "service_vs_app_searches": batched["search"]["per_s"] / app["per_s"],
    }
    print(json.dumps(r, indent=1, default=lambda v: round(v, 3)))


if __name__ == "__main__":
    main()
