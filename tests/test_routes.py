"""The service's routes in-process: FastAPI's TestClient on the real app, no server.

A real index (12 labelled images embedded by `mocoserve embed` with the test package) is
loaded once into a `ServiceState` and handed to `create_app`; tests swap what a route sees
through `app.dependency_overrides` (a service still loading, smaller limits, an index for
a service started with --model only). What needs a real server (connection limits,
reloads under load, the UI) is in test_service*.py, test_reload.py and test_hostile_service.py.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from mocoserve.cli import app as cli
from mocoserve.service.deps import get_config, get_served, get_state
from mocoserve.service.main import create_app
from mocoserve.service.state import ServiceConfig, ServiceState
from tests.imagegen import make_labelled

KEY = "k3y-for-the-tests-0123456789"
ITEMS = 12  # 3 classes x 4 images


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("routes")
    images = make_labelled(root / "images", classes=3, per_class=4)
    index = root / "out.faiss"
    made = CliRunner().invoke(
        cli,
        ["embed", str(images), "--index", str(index), "--model", str(model_dir)]
        + ["--labels-from-folders", "--quiet", "--workers", "0"],
    )
    assert made.exit_code == 0, made.output
    state = ServiceState(ServiceConfig(index=index, device="cpu", ui=False))
    state.load()
    return {"root": root, "images": images, "index": index, "state": state}


@pytest.fixture(scope="module")
def app(world) -> FastAPI:
    state = world["state"]
    return create_app(state.config, state)


@pytest.fixture(scope="module")
def http(app) -> Iterator[TestClient]:
    with TestClient(app) as client:  # the lifespan: the batcher runs (the state is loaded)
        yield client


@contextmanager
def overridden(app: FastAPI, dependency: Any, value: Any) -> Iterator[None]:
    """The app's routes get `value` for `dependency` inside the block."""
    app.dependency_overrides[dependency] = lambda: value
    try:
        yield
    finally:
        del app.dependency_overrides[dependency]


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """The message of a JSON error of this status and code (the body holds nothing else)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def image_of(world: dict, label: int, i: int) -> Path:
    return world["images"] / f"class_{label}" / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"


def item_id_of(world: dict, path: Path) -> int:
    """The id the index gave this file."""
    index = world["state"].served.index
    items = index.items([int(i) for i in index.ids()])
    return next(i for i, item in items.items() if Path(item.path).samefile(path))


def expected_embedding(world: dict, path: Path) -> np.ndarray:
    encoder = world["state"].encoder
    with Image.open(path) as img:
        return encoder.embed(encoder.preprocess(img.convert("RGB"))[None])[0]


# --- health and readiness ---


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}


def test_a_service_still_loading_is_503_with_retry_after_but_live(app, http, world):
    loading = ServiceState(world["state"].config)  # never loaded: status "loading"
    with overridden(app, get_state, loading):
        assert error_of(http.get("/readyz"), 503, "loading") == "the service is loading"
        for answer in (
            http.get("/v1/info"),
            http.post("/v1/search", json={"ids": [1]}),
            http.post("/v1/embed", json={"images": ["eA=="]}),
            http.get("/v1/items/1"),
        ):
            error_of(answer, 503, "loading")
            assert answer.headers["retry-after"] == "5"
        error_of(http.get("/v1/items/-1"), 422, "invalid_request")  # a bad id, whatever the state
        assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


# --- API keys ---


def test_api_keys_guard_every_route_but_the_health_checks(world):
    state = world["state"]
    keyed = TestClient(create_app(replace(state.config, api_keys=(KEY,)), state))
    for route in ("/v1/info", "/metrics", "/openapi.json", "/docs", "/v1/items/1", "/v1/nothing"):
        missing = keyed.get(route)
        assert "Bearer KEY" in error_of(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = keyed.get(route, headers={"Authorization": "Bearer not-the-key-at-all"})
        assert error_of(wrong, 401, "unauthorized") == "that API key is not valid"
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/v1/info", headers=auth).status_code == 200
    assert keyed.get("/v1/items/1", headers=auth).status_code == 200
    error_of(keyed.get("/v1/nothing", headers=auth), 404, "not_found")
    refused = keyed.post("/v1/embed", content=b"\0" * 100, headers={"Content-Type": "image/png"})
    error_of(refused, 401, "unauthorized")  # before the body is read
    assert keyed.get("/healthz").status_code == keyed.get("/readyz").status_code == 200


# --- embed ---


def test_embed_multipart_json_raw_and_npy_agree_with_the_model(http, world):
    paths = [image_of(world, 0, 0), image_of(world, 1, 1)]
    files = [("images", (p.name, p.read_bytes())) for p in paths]
    files.append(("images", ("text.png", b"not an image")))
    body = http.post("/v1/embed", files=files).json()
    assert body["model"]["dim"] == 512 and len(body["model"]["sha256"]) == 64
    assert [e and e["code"] for e in body["errors"]] == [None, None, "not_an_image"]
    assert body["embeddings"][2] is None
    for path, served in zip(paths, body["embeddings"][:2], strict=True):
        vector = np.asarray(served, np.float32)
        expected = expected_embedding(world, path)
        assert float(vector @ expected) > 0.9999 and abs(np.linalg.norm(vector) - 1) < 1e-5
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths] + ["not base64!"]
    by_json = http.post("/v1/embed", json={"images": encoded}).json()
    np.testing.assert_allclose(by_json["embeddings"][:2], body["embeddings"][:2], atol=1e-6)
    assert by_json["errors"][2]["code"] == "bad_base64"
    raw = http.post(
        "/v1/embed", content=paths[1].read_bytes(), headers={"Content-Type": "image/png"}
    )
    np.testing.assert_allclose(raw.json()["embeddings"][0], body["embeddings"][1], atol=1e-6)
    npy = http.post("/v1/embed", files=files, headers={"Accept": "application/x-npy"})
    assert npy.headers["content-type"] == "application/x-npy"
    assert npy.headers["x-mocoserve-model-sha256"] == body["model"]["sha256"]
    array = np.load(io.BytesIO(npy.content))
    assert array.shape == (3, 512) and array.dtype == np.float32 and np.isnan(array[2]).all()
    np.testing.assert_allclose(array[:2], body["embeddings"][:2], atol=1e-6)
    failed = json.loads(npy.headers["x-mocoserve-errors"])
    assert [(e["index"], e["code"]) for e in failed] == [(2, "not_an_image")]


def test_embed_refuses_bodies_it_cannot_read(app, http, world):
    error_of(http.post("/v1/embed", content=b"hello"), 415, "unsupported_media_type")
    malformed = http.post(
        "/v1/embed", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    error_of(malformed, 400, "invalid_request")
    error_of(http.post("/v1/embed", json={"images": []}), 422, "invalid_request")
    unknown = http.post("/v1/embed", json={"pictures": ["x"]})
    assert error_of(unknown, 422, "invalid_request") == "images: Field required (and 1 more)"
    data = image_of(world, 0, 0).read_bytes()
    noted = http.post("/v1/embed", data={"note": "x"}, files=[("images", ("q.jpg", data))])
    assert error_of(noted, 422, "invalid_request") == (
        "note: not a field (the form takes image files)"
    )
    with overridden(app, get_config, replace(world["state"].config, max_images=2)):
        three = http.post("/v1/embed", files=[("images", ("q.jpg", data))] * 3)
        assert error_of(three, 413, "too_many") == "at most 2 images or queries per request"
        assert http.post("/v1/embed", files=[("images", ("q.jpg", data))] * 2).status_code == 200


# --- search ---


def test_search_by_image_vector_and_id_find_the_same_items(http, world):
    query = image_of(world, 2, 1)
    own = item_id_of(world, query)
    by_image = http.post(
        "/v1/search", files=[("images", (query.name, query.read_bytes()))], data={"k": "4"}
    ).json()
    hits = by_image["results"][0]["hits"]
    assert len(hits) == 4 and hits[0]["id"] == own and hits[0]["score"] > 0.9999
    assert hits[0]["label"] == "class_2" and hits[0]["url"] == f"/v1/items/{own}/image"
    assert by_image["index_version"] == 1 and all("path" not in h for h in hits)
    vector = expected_embedding(world, query).tolist()
    by_vector = http.post("/v1/search", json={"vectors": [vector], "k": 4}).json()
    assert [h["id"] for h in by_vector["results"][0]["hits"]] == [h["id"] for h in hits]
    by_id = http.post("/v1/search", json={"ids": [own], "k": 4}).json()["results"][0]["hits"]
    assert {h["id"] for h in by_id} == {h["id"] for h in hits} and by_id[0]["id"] == own
    assert [h["is_query"] for h in by_id] == [True, False, False, False]
    labelled = http.post("/v1/search", json={"ids": [own], "k": 4, "label": "class_0"}).json()
    found = labelled["results"][0]["hits"]
    assert len(found) == 4 and {h["label"] for h in found} == {"class_0"}
    every = http.post("/v1/search", json={"ids": [own], "k": ITEMS}).json()["results"][0]["hits"]
    assert len(every) == ITEMS
    threshold = every[ITEMS // 2]["score"]
    close = http.post("/v1/search", json={"ids": [own], "k": ITEMS, "min_score": threshold})
    kept = [h["id"] for h in close.json()["results"][0]["hits"]]
    assert kept == [h["id"] for h in every if h["score"] >= threshold] and 0 < len(kept) < ITEMS


def test_search_errors(app, http, world):
    own = item_id_of(world, image_of(world, 0, 0))
    assert "id 999999" in error_of(
        http.post("/v1/search", json={"ids": [own, 999999]}), 404, "unknown_id"
    )
    error_of(http.post("/v1/search", json={"ids": [own], "label": "nosuch"}), 400, "unknown_label")
    error_of(http.post("/v1/search", json={"vectors": [[1.0, 2.0]]}), 400, "bad_vector")
    error_of(http.post("/v1/search", json={"vectors": [[0.0] * 512]}), 400, "bad_vector")
    both = http.post("/v1/search", json={"ids": [own], "vectors": [[1.0] * 512]})
    assert "exactly one" in error_of(both, 400, "bad_request")
    error_of(http.post("/v1/search", json={"k": 3}), 400, "bad_request")
    error_of(http.post("/v1/search", json={"ids": [own], "k": 0}), 422, "invalid_request")
    error_of(http.post("/v1/search", json={"ids": [2**63]}), 422, "invalid_request")
    form = http.post("/v1/search", files=[("images", ("q.png", b"x"))], data={"ids": "1"})
    assert "JSON" in error_of(form, 400, "bad_request")
    with overridden(app, get_config, replace(world["state"].config, max_hits=5)):
        many = http.post("/v1/search", json={"ids": [own, own], "k": 3})
        assert "6 hits; at most 5" in error_of(many, 422, "too_many_hits")
        assert http.post("/v1/search", json={"ids": [own], "k": 5}).status_code == 200


def test_a_model_only_service_searches_an_index_it_is_given(world, model_dir):
    embedding_only = ServiceState(ServiceConfig(model=model_dir, device="cpu", ui=False))
    embedding_only.load()
    service = create_app(embedding_only.config, embedding_only)
    client = TestClient(service)
    vector = expected_embedding(world, image_of(world, 1, 2)).tolist()
    query = {"vectors": [vector], "k": 2}
    error_of(client.post("/v1/search", json=query), 404, "no_index")
    assert client.get("/v1/info").json()["index"] is None
    with overridden(service, get_served, world["state"].served):
        found = client.post("/v1/search", json=query)
        assert found.status_code == 200, found.text
        top = found.json()["results"][0]["hits"][0]
        assert top["id"] == item_id_of(world, image_of(world, 1, 2)) and top["score"] > 0.9999


# --- items ---


def test_items_by_id_and_their_files(http, world):
    path = image_of(world, 1, 3)
    own = item_id_of(world, path)
    item = http.get(f"/v1/items/{own}").json()
    with Image.open(path) as img:
        size = img.size
    assert item == {
        "id": own,
        "label": "class_1",
        "sha256": item["sha256"],
        "bytes": path.stat().st_size,
        "width": size[0],
        "height": size[1],
        "url": f"/v1/items/{own}/image",
    }
    image = http.get(f"/v1/items/{own}/image")
    assert image.status_code == 200 and image.content == path.read_bytes()
    assert image.headers["content-type"] == "image/png"
    assert image.headers["content-disposition"] == f"inline; filename*=UTF-8''{path.name}"
    assert image.headers["x-content-type-options"] == "nosniff"
    error_of(http.get("/v1/items/999999"), 404, "unknown_id")
    error_of(http.get("/v1/items/999999/image"), 404, "unknown_id")
    for bad in ("-3", str(2**63), "x"):
        error_of(http.get(f"/v1/items/{bad}"), 422, "invalid_request")
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"appended")  # not the bytes that were embedded
        error_of(http.get(f"/v1/items/{own}/image"), 404, "gone")
    finally:
        path.write_bytes(original)


# --- info, metrics and the error shape ---


def test_info_describes_the_model_index_and_service(http, world):
    info = http.get("/v1/info").json()
    assert info["model"]["dim"] == 512 and info["model"]["provider"] == "CPUExecutionProvider"
    assert "path" not in info["model"] and "path" not in info["index"]
    index = info["index"]
    assert (index["items"], index["type"], index["labels"], index["version"]) == (
        ITEMS,
        "Flat",
        3,
        1,
    )
    assert index["reload_error"] is None
    service = info["service"]
    assert service["max_hits"] == 10_000 and service["queued_images"] == 0
    assert service["ui"] is False


def test_metrics_count_requests_by_route_template(http, world):
    own = item_id_of(world, image_of(world, 0, 1))

    def count(text: str) -> float:
        key = 'mocoserve_requests_total{endpoint="/v1/items/{item_id}",status="200"}'
        lines = [line for line in text.splitlines() if line.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count(http.get("/metrics").text)
    http.get(f"/v1/items/{own}")
    http.get(f"/v1/items/{own}")
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert count(metrics.text) == before + 2
    assert f"mocoserve_index_items {float(ITEMS)}" in metrics.text


def test_unknown_routes_and_methods_are_the_one_json_shape(http):
    error_of(http.get("/v1/nothing"), 404, "not_found")
    error_of(http.get("/v1/items/..%2F..%2Fetc%2Fpasswd"), 404, "not_found")
    error_of(http.post("/healthz"), 405, "method_not_allowed")
    error_of(http.get("/v1/search"), 405, "method_not_allowed")


def test_the_openapi_spec_lists_every_route(http):
    spec = http.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/healthz",
        "/readyz",
        "/v1/embed",
        "/v1/search",
        "/v1/items/{item_id}",
        "/v1/items/{item_id}/image",
        "/v1/info",
        "/metrics",
    }
    embed = spec["paths"]["/v1/embed"]["post"]
    assert {"application/json", "multipart/form-data", "image/*"} == set(
        embed["requestBody"]["content"]
    )
    assert "503" in embed["responses"]
