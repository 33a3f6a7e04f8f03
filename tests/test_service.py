"""`mocoserve serve` against the real server: uvicorn in a subprocess, real HTTP on loopback."""

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mocoserve import model as packages
from mocoserve.export.package import embedding_model, export_checkpoint
from mocoserve.service.batching import Batcher, QueueFull
from mocoserve.train import checkpoint
from mocoserve.train.augment import eval_transform
from tests.imagegen import _png_header_only, class_image, make_labelled
from tests.models import make_checkpoint

KEY = "k3y-for-the-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mocoserve serve ARGS` on a free port; `url`, `stop()` and its output."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mocoserve", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.out = self.err = ""

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stop()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s: {self.stop()}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.out, self.err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.out, self.err = self.proc.communicate()
        return self.err


def embed(images: Path, index: Path, package: Path | None = None, *extra: str) -> None:
    """`mocoserve embed IMAGES --index INDEX` (labelled by folder) in a subprocess; it must pass."""
    model = ["--model", str(package)] if package is not None else []
    made = subprocess.run(
        [sys.executable, "-m", "mocoserve", "embed", str(images), "--index", str(index)]
        + [*model, "--labels-from-folders", "--quiet", "--workers", "0", *extra],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr


def make_world(root: Path) -> dict:
    """A checkpoint, its package (32 px), labelled images with a JPEG and a PNG, an index."""
    ckpt = make_checkpoint(root / "c.pt")
    package = export_checkpoint(ckpt, root / "model", formats=("onnx",)).out
    images = make_labelled(root / "images", classes=3, per_class=6)
    photo = class_image(1, 50, size=180).resize((240, 160))
    photo.save(images / "class_1" / "photo.jpg", quality=92)
    photo.save(images / "class_1" / "photo.png")
    index = root / "out.faiss"
    embed(images, index, package)
    return {"root": root, "ckpt": ckpt, "package": package, "images": images, "index": index}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def server(world):
    s = Server("--index", str(world["index"]), "--max-delay-ms", "20")
    s.wait_ready()
    yield s
    s.stop()
    assert "Traceback" not in s.err, s.err


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.*") if p.suffix in (".png", ".jpg"))


def post_files(url: str, paths: list[Path], route: str = "/v1/embed", **kw) -> httpx.Response:
    files = [("images", (p.name, p.read_bytes())) for p in paths]
    return httpx.post(f"{url}{route}", files=files, timeout=60, **kw)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- embeddings: the bytes a client sends, against the package and against training ---


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png"])
def test_raw_bytes_parity_with_the_package_and_with_training(server, world, name):
    path = world["images"] / "class_1" / name
    response = post_files(server.url, [path])
    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["embeddings"][0], dtype=np.float32)
    # the package, as the Python API runs it
    encoder = packages.load(world["package"])
    with Image.open(path) as img:
        expected = encoder.embed(encoder.preprocess(img.convert("RGB"))[None])[0]
    assert cosine(served, expected) >= 0.9999
    # the checkpoint's PyTorch query encoder on the training-time eval transform
    reference, cfg = embedding_model(checkpoint.load(world["ckpt"]), "backbone")
    with Image.open(path) as img, torch.no_grad():
        x = eval_transform(cfg.data)(img.convert("RGB")).unsqueeze(0)
        trained = F.normalize(reference.backbone(x), dim=1)[0].numpy()
    assert cosine(served, trained) >= 0.9999
    assert abs(np.linalg.norm(served) - 1) < 1e-5


def test_embed_json_npy_and_per_image_errors(server, world, tmp_path):
    good = files_of(world["images"])[:2]
    bad = {
        "text.png": b"not an image at all",
        "truncated.jpg": (world["images"] / "class_1" / "photo.jpg").read_bytes()[:300],
        "bomb.png": _png_header_only(20_000, 10_000),
        "empty.png": b"",
    }
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in good]
    encoded += [base64.b64encode(data).decode() for data in bad.values()]
    encoded.append("this is not base64!")
    response = httpx.post(f"{server.url}/v1/embed", json={"images": encoded}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["dim"] == 512 and len(body["model"]["sha256"]) == 64
    assert [e is None for e in body["embeddings"]] == [False, False] + [True] * 5
    codes = [e and e["code"] for e in body["errors"]]
    assert codes == [None, None, "not_an_image", "undecodable", "too_many_pixels", "empty"] + [
        "bad_base64"
    ]
    npy = httpx.post(
        f"{server.url}/v1/embed",
        json={"images": encoded[:3]},
        headers={"Accept": "application/x-npy"},
        timeout=60,
    )
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(npy.content))
    assert array.shape == (3, 512) and array.dtype == np.float32
    np.testing.assert_allclose(array[:2], np.asarray(body["embeddings"][:2]), atol=1e-6)
    assert np.isnan(array[2]).all()
    assert json.loads(npy.headers["x-mocoserve-errors"])[0]["index"] == 2
    raw = httpx.post(
        f"{server.url}/v1/embed",
        content=good[0].read_bytes(),
        headers={"Content-Type": "image/png"},
    )
    assert raw.status_code == 200
    assert np.allclose(raw.json()["embeddings"][0], body["embeddings"][0], atol=1e-6)


# --- search ---


def test_search_by_image_vector_and_id_with_self_retrieval(server, world):
    query = world["images"] / "class_2" / "img_002.jpg"
    by_image = post_files(server.url, [query], "/v1/search", data={"k": "4"}).json()
    hits = by_image["results"][0]["hits"]
    assert len(hits) == 4 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    own = hits[0]["id"]
    item = httpx.get(f"{server.url}/v1/items/{own}").json()
    assert item["label"] == "class_2" and item["width"] == 40 and "path" not in item
    assert all("path" not in h for h in hits) and hits[0]["url"] == f"/v1/items/{own}/image"
    vector = httpx.post(
        f"{server.url}/v1/embed", files=[("images", (query.name, query.read_bytes()))]
    ).json()["embeddings"][0]
    by_vector = httpx.post(f"{server.url}/v1/search", json={"vectors": [vector], "k": 4}).json()
    assert [h["id"] for h in by_vector["results"][0]["hits"]] == [h["id"] for h in hits]
    by_id = httpx.post(f"{server.url}/v1/search", json={"ids": [own], "k": 4}).json()
    first = by_id["results"][0]["hits"][0]
    assert first["id"] == own and first["is_query"] and by_id["index_version"] == 1  # one embed
    labelled = httpx.post(
        f"{server.url}/v1/search", json={"ids": [own], "k": 5, "label": "class_0"}
    ).json()["results"][0]["hits"]
    assert labelled and {h["label"] for h in labelled} == {"class_0"}
    close = httpx.post(
        f"{server.url}/v1/search", json={"ids": [own], "k": 20, "min_score": 0.99}
    ).json()["results"][0]["hits"]
    assert close and all(h["score"] >= 0.99 for h in close)
    image = httpx.get(f"{server.url}/v1/items/{own}/image")
    assert image.status_code == 200 and image.content == query.read_bytes()
    assert image.headers["x-content-type-options"] == "nosniff"


def test_every_error_is_one_json_shape_with_its_code(server, world, tmp_path):
    url = server.url
    good = files_of(world["images"])[0]

    def check(response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, (response.status_code, response.text)
        assert response.json()["error"]["code"] == code, response.text
        assert "Traceback" not in response.text and str(world["root"]) not in response.text

    check(httpx.post(f"{url}/v1/search", json={"ids": [0], "k": 0}), 422, "invalid_request")
    check(httpx.post(f"{url}/v1/search", json={"ids": [1], "k": 5000}), 422, "invalid_request")
    check(post_files(url, [good], "/v1/search", data={"k": "many"}), 422, "invalid_request")
    check(httpx.post(f"{url}/v1/search", json={"ids": [10**6]}), 404, "unknown_id")
    check(httpx.get(f"{url}/v1/items/999999"), 404, "unknown_id")
    check(httpx.get(f"{url}/v1/items/-3"), 422, "invalid_request")
    check(httpx.get(f"{url}/v1/items/..%2F..%2Fetc%2Fpasswd"), 404, "not_found")
    check(httpx.get(f"{url}/v1/nothing"), 404, "not_found")
    check(
        httpx.post(f"{url}/v1/search", json={"ids": [1], "label": "nosuch"}), 400, "unknown_label"
    )
    check(httpx.post(f"{url}/v1/search", json={"vectors": [[1.0, 2.0]]}), 400, "bad_vector")
    check(httpx.post(f"{url}/v1/search", json={"ids": [1], "vectors": [[1.0]]}), 400, "bad_request")
    check(httpx.post(f"{url}/v1/search", json={"k": 3}), 400, "bad_request")
    check(httpx.post(f"{url}/v1/embed", json={"images": []}), 422, "invalid_request")
    check(httpx.post(f"{url}/v1/embed", json={"pictures": ["x"]}), 422, "invalid_request")
    malformed = httpx.post(
        f"{url}/v1/embed", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    check(malformed, 400, "invalid_request")
    check(httpx.post(f"{url}/v1/embed", content=b"hello"), 415, "unsupported_media_type")
    big = b"\0" * (21 * 2**20)
    oversize = httpx.post(
        f"{url}/v1/embed", content=big, headers={"Content-Type": "image/png"}, timeout=60
    )
    check(oversize, 413, "too_large")

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(22):
            yield b"\0" * 2**20

    streamed = httpx.post(
        f"{url}/v1/embed", content=chunks(), headers={"Content-Type": "image/png"}, timeout=60
    )
    check(streamed, 413, "too_large")
    many = {"images": [base64.b64encode(good.read_bytes()).decode()] * 300}
    check(httpx.post(f"{url}/v1/embed", json=many, timeout=60), 413, "too_many")
    # the changed file behind an item is not served (only the bytes that were embedded)
    changed = world["images"] / "class_0" / "img_000.jpg"
    hit = post_files(url, [changed], "/v1/search", data={"k": "1"}).json()["results"][0]
    item_id = hit["hits"][0]["id"]
    original = changed.read_bytes()
    try:
        changed.write_bytes(original + b"appended")
        check(httpx.get(f"{url}/v1/items/{item_id}/image"), 404, "gone")
    finally:
        changed.write_bytes(original)
    assert httpx.get(f"{url}/v1/items/{item_id}/image").content == original


def test_info_health_openapi_and_the_ui(server):
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["model"]["dim"] == 512 and info["model"]["provider"] == "CPUExecutionProvider"
    assert info["index"]["items"] == 20 and info["index"]["type"] == "Flat"
    assert info["index"]["version"] == 1 and "path" not in info["index"]
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/embed", "/v1/search", "/v1/items/{item_id}", "/v1/info"} <= set(spec["paths"])
    assert httpx.get(f"{server.url}/docs").status_code == 200
    page = httpx.get(f"{server.url}/ui/", follow_redirects=True)
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_the_ui_searches_the_services_index(server, world):
    from gradio_client import Client, handle_file

    client = Client(f"{server.url}/ui/", verbose=False, download_files=False)
    query = world["images"] / "class_1" / "img_001.png"
    _, results, status = client.predict(
        handle_file(str(query)), 3, "(any label)", api_name="/search"
    )
    assert results[0]["name"] == query.name and "of 20" in status


def test_metrics_parse_and_move(server, world):
    def counters() -> dict:
        text = httpx.get(f"{server.url}/metrics").text
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    before = counters()
    key = ("mocoserve_requests_total", (("endpoint", "/v1/embed"), ("status", "200")))
    post_files(server.url, files_of(world["images"])[:3])
    after = counters()
    assert after[key] == before.get(key, 0) + 1
    assert after[("mocoserve_index_items", ())] == 20
    assert after[("mocoserve_batch_size_count", ())] > before.get(
        ("mocoserve_batch_size_count", ()), 0
    )
    decodes = ("mocoserve_decode_seconds_count", ())
    assert after[decodes] == before.get(decodes, 0) + 3  # this request's three images
    assert any(name == "mocoserve_model_info" for name, _ in after)


def test_dynamic_batching_groups_concurrent_requests(server, world):
    query = files_of(world["images"])[0]
    data = query.read_bytes()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(
                *[
                    client.post(f"{server.url}/v1/embed", files=[("images", ("q.png", data))])
                    for _ in range(24)
                ]
            )
        return [r.status_code for r in replies]

    def batches() -> tuple[float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        values = {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name in ("mocoserve_batch_size_sum", "mocoserve_batch_size_count")
        }
        return values["mocoserve_batch_size_sum"], values["mocoserve_batch_size_count"]

    images_before, calls_before = batches()
    assert asyncio.run(burst()) == [200] * 24
    images, calls = batches()
    assert images - images_before == 24
    assert calls - calls_before < 24  # fewer model calls than requests: they were batched


# --- auth, loading, hot reload ---


def test_api_keys_guard_everything_but_the_health_checks(world, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# one key a line\n{KEY}\nanother-key-0123456789abcdef\n")
    keys.chmod(0o600)
    s = Server("--index", str(world["index"]), "--api-key-file", str(keys))
    try:
        s.wait_ready()
        auth = {"Authorization": f"Bearer {KEY}"}
        for route in ("/v1/info", "/metrics", "/openapi.json", "/v1/items/1"):
            missing = httpx.get(f"{s.url}{route}")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = httpx.get(f"{s.url}{route}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert httpx.get(f"{s.url}{route}", headers=auth).status_code == 200
        other = {"Authorization": "Bearer another-key-0123456789abcdef"}
        assert httpx.get(f"{s.url}/v1/info", headers=other).status_code == 200
        assert httpx.get(f"{s.url}/healthz").status_code == 200
        assert httpx.get(f"{s.url}/readyz").status_code == 200
        # the page asks for a login; the key is the password
        assert httpx.get(f"{s.url}/ui/config").status_code in (401, 403)
        from gradio_client import Client

        Client(f"{s.url}/ui/", verbose=False, auth=("anyone", KEY))
    finally:
        s.stop()
    assert "Traceback" not in s.err


def test_embedding_only_service_and_bad_starts(world, tmp_path):
    s = Server("--model", str(world["package"]), "--no-ui")
    try:
        s.wait_ready()
        embedded = post_files(s.url, files_of(world["images"])[:1])
        assert embedded.status_code == 200
        search = httpx.post(f"{s.url}/v1/search", json={"ids": [1]})
        assert search.status_code == 404 and search.json()["error"]["code"] == "no_index"
        assert httpx.get(f"{s.url}/v1/info").json()["index"] is None
        assert httpx.get(f"{s.url}/ui/").status_code == 404
    finally:
        s.stop()
    for args, words in [
        ([], "give --index"),
        (["--index", str(tmp_path / "none.faiss")], "is not an index"),
        (["--model", str(tmp_path)], "is not a model package"),
        (["--model", str(world["package"]), "--max-queue", "2"], "--max-queue must be at least"),
    ]:
        bad = Server(*args)
        _, err = bad.proc.communicate(timeout=60)
        assert bad.proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err


def test_hot_reload_while_embed_adds_images(world, tmp_path):
    """A client searches without pause while another process embeds 50 more images."""
    folder = tmp_path / "growing"
    shutil.copytree(world["images"], folder)
    index = tmp_path / "live.faiss"
    base = [sys.executable, "-m", "mocoserve", "embed", str(folder), "--index", str(index)]
    first = subprocess.run(
        base + ["--model", str(world["package"]), "--quiet"], capture_output=True
    )
    assert first.returncode == 0
    s = Server("--index", str(index), "--no-ui")
    s.wait_ready()
    failures, searches, stop = [], [0], threading.Event()
    query = {"ids": [1], "k": 5}

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                reply = http.post(f"{s.url}/v1/search", json=query)
                searches[0] += 1
                if reply.status_code != 200:
                    failures.append(reply.text)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        added = folder / "added"
        added.mkdir()
        for i in range(50):
            class_image(i % 5, 500 + i).save(added / f"new_{i:02d}.png")
        more = subprocess.run(base + ["--quiet", "--workers", "1"], capture_output=True, text=True)
        assert more.returncode == 0, more.stderr
        target = added / "new_07.png"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = post_files(s.url, [target], "/v1/search", data={"k": "1"}).json()
            top = found["results"][0]["hits"][0]
            if (
                top["score"] > 0.9999
                and httpx.get(f"{s.url}/v1/info").json()["index"]["items"] == 70
            ):
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the new images were not found without a restart")
        assert found["index_version"] == 2
    finally:
        stop.set()
        thread.join()
        s.stop()
    assert searches[0] > 20 and not failures, failures[:3]
    assert "reloaded" in s.err and "Traceback" not in s.err


# --- the batcher on its own ---


def test_batcher_groups_requests_and_refuses_beyond_its_queue():
    calls: list[int] = []
    gate = threading.Event()

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        gate.wait(5)
        return batch.reshape(len(batch), -1)[:, :4].copy()

    async def scenario() -> None:
        batcher = Batcher(run, max_batch=4, max_delay_s=0.05, max_queue=6)
        batcher.start()
        pixels = [np.full((2, 2, 3), i, np.uint8) for i in range(6)]
        first = asyncio.ensure_future(batcher.embed(pixels[:3]))
        second = asyncio.ensure_future(batcher.embed(pixels[3:5]))
        await asyncio.sleep(0.2)  # one batch of 4 is in the model; 1 image waits
        assert calls == [4] and batcher.waiting == 1
        third = asyncio.ensure_future(batcher.embed(pixels[:5]))  # 1 + 5 fit in 6
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.embed(pixels[:1])  # 7 would not
        gate.set()
        a, b, c = await asyncio.gather(first, second, third)
        assert a.shape == (3, 4) and b.shape == (2, 4) and c.shape == (5, 4)
        np.testing.assert_allclose(b[:, 0], [3 / 255, 4 / 255], rtol=1e-6)
        assert sum(calls) == 10 and max(calls) <= 4
        await batcher.stop()

    asyncio.run(scenario())


def test_a_full_queue_is_503_with_retry_after(world):
    """In-process: a slow model, a queue of one image, three requests at once."""
    from fastapi.testclient import TestClient

    from mocoserve.service.main import create_app
    from mocoserve.service.state import ServiceConfig

    config = ServiceConfig(model=world["package"], max_batch=1, max_queue=1, max_delay_ms=0)
    app = create_app(config)
    data = files_of(world["images"])[0].read_bytes()
    with TestClient(app) as http:
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        encoder = app.state.service.encoder
        fast = encoder._run
        encoder._run = lambda x: (time.sleep(0.6), fast(x))[1]
        replies: list[httpx.Response] = []

        def one() -> None:
            replies.append(http.post("/v1/embed", files=[("images", ("q.png", data))]))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 503], [r.text for r in replies]
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "1"


@pytest.mark.parametrize("origins", [(), ("https://app.example.com",)])
def test_cors_is_off_unless_an_origin_is_given(world, origins):
    from fastapi.testclient import TestClient

    from mocoserve.service.main import create_app
    from mocoserve.service.state import ServiceConfig

    app = create_app(ServiceConfig(model=world["package"], cors_origins=origins))
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with TestClient(app) as http:
        answer = http.options("/v1/embed", headers=preflight)
        health = http.get("/healthz", headers={"Origin": "https://evil.example.net"})
    allowed = answer.headers.get("access-control-allow-origin")
    assert allowed == ("https://app.example.com" if origins else None)
    assert "access-control-allow-origin" not in health.headers  # another origin: never
