"""Hostile findings against `mocoserve serve` (issue 19, items 9 and 10), one test each.

Against the real server (uvicorn in a subprocess, real HTTP on loopback), built as
tests/test_service.py builds its own: every answer is a 200 or one JSON 4xx, never a 500.
"""

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.imagegen import class_image
from tests.test_service import Server, embed, files_of, make_world, post_files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("hostile-service"))


@pytest.fixture(scope="module")
def server(world):
    s = Server("--index", str(world["index"]), "--no-ui")
    s.wait_ready()
    yield s
    s.stop()
    assert "Traceback" not in s.err, s.err


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """The message of a JSON error of this status and code."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    assert body["code"] == code, body
    return body["message"]


def multipart(boundary: str, name: str, data: bytes) -> bytes:
    """One file part, without the closing boundary."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data


# --- item 9 ---


def test_ids_beyond_int64_are_a_422_not_a_500(server):
    for ids in ([2**63], [1, 2**70], [-1]):
        reply = httpx.post(f"{server.url}/v1/search", json={"ids": ids, "k": 3})
        assert "ids" in error_of(reply, 422, "invalid_request")
    for route in (f"/v1/items/{2**63}", f"/v1/items/{2**64 + 5}/image"):
        error_of(httpx.get(f"{server.url}{route}"), 422, "invalid_request")
    assert httpx.post(f"{server.url}/v1/search", json={"ids": [2**62]}).status_code == 404


def test_a_name_that_is_not_utf8_is_served_as_its_bytes_escaped(world, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    named = (os.fsencode(folder) + b"/bad\xffname.png").decode("utf-8", "surrogateescape")
    class_image(0, 1).save(named)
    class_image(2, 3).save(folder / "ok.png")
    index = tmp_path / "odd.faiss"
    embed(folder, index, world["package"])
    s = Server("--index", str(index), "--no-ui", "--expose-paths")
    try:
        s.wait_ready()
        data = Path(named).read_bytes()
        found = httpx.post(
            f"{s.url}/v1/search", files=[("images", ("q.png", data))], data={"k": "2"}
        )
        assert found.status_code == 200, found.text
        hits = found.json()["results"][0]["hits"]
        expected = f"{folder}/bad\\xffname.png"  # the byte that is not UTF-8 as the text \xff
        assert hits[0]["path"] == expected and hits[0]["score"] > 0.9999
        assert hits[1]["path"] == str(folder / "ok.png")  # a UTF-8 name as it is
        by_id = httpx.post(f"{s.url}/v1/search", json={"ids": [hits[1]["id"]], "k": 2})
        assert (
            by_id.status_code == 200 and by_id.json()["results"][0]["hits"][1]["path"] == expected
        )
        item = httpx.get(f"{s.url}/v1/items/{hits[0]['id']}")
        assert item.status_code == 200 and item.json()["path"] == expected
        image = httpx.get(f"{s.url}/v1/items/{hits[0]['id']}/image")
        assert image.status_code == 200 and image.content == data
    finally:
        s.stop()
    assert "Traceback" not in s.err, s.err


# --- item 10 ---


def test_a_multipart_body_cut_short_says_the_form_could_not_be_read(server, world):
    data = files_of(world["images"])[0].read_bytes()
    for route in ("/v1/embed", "/v1/search"):
        for body in (multipart("b0und", "q.png", data), b"--b0und\r\nnot a part at all"):
            reply = httpx.post(
                f"{server.url}{route}",
                content=body,
                headers={"Content-Type": "multipart/form-data; boundary=b0und"},
            )
            assert "form could not be read" in error_of(reply, 400, "bad_request")
    whole = multipart("b0und", "q.png", data) + b"\r\n--b0und--\r\n"
    reply = httpx.post(
        f"{server.url}/v1/embed",
        content=whole,
        headers={"Content-Type": "multipart/form-data; boundary=b0und"},
    )
    assert reply.status_code == 200 and reply.json()["errors"] == [None]


def test_multipart_ids_or_vectors_are_refused_not_ignored(server, world):
    query = files_of(world["images"])[:1]
    for field in ({"ids": "1"}, {"vectors": "[0.5, 0.5]"}):
        reply = post_files(server.url, query, "/v1/search", data={**field, "k": "2"})
        assert "JSON" in error_of(reply, 400, "bad_request")
    other = post_files(server.url, query, "/v1/search", data={"kk": "2"})
    assert "kk" in error_of(other, 422, "invalid_request")
    assert post_files(server.url, query, "/v1/search", data={"k": "2"}).status_code == 200


def test_a_vector_too_small_or_large_for_float32_is_normalised_not_scored_0(server, world):
    query = files_of(world["images"])[3]
    unit = np.asarray(post_files(server.url, [query]).json()["embeddings"][0])

    def search(vector) -> list[dict]:
        reply = httpx.post(f"{server.url}/v1/search", json={"vectors": [vector], "k": 5})
        assert reply.status_code == 200, reply.text
        return reply.json()["results"][0]["hits"]

    expected = search(unit.tolist())
    assert expected[0]["score"] > 0.9999
    for scale in (1e-25, 1e25):  # float32: the squared norm under- or overflows
        hits = search((unit * scale).tolist())
        assert [h["id"] for h in hits] == [h["id"] for h in expected]
        assert hits[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    zero = httpx.post(f"{server.url}/v1/search", json={"vectors": [[0.0] * len(unit)]})
    assert "normalis" in error_of(zero, 400, "bad_vector")


def test_min_score_nan_says_it_must_be_finite(server, world):
    reply = httpx.post(
        f"{server.url}/v1/search",
        content=b'{"ids": [1], "min_score": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert "finite" in error_of(reply, 422, "invalid_request")
    form = post_files(
        server.url, files_of(world["images"])[:1], "/v1/search", data={"min_score": "nan"}
    )
    assert "finite" in error_of(form, 422, "invalid_request")


def test_readyz_stays_200_while_a_reload_opens_the_next_index(world, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    index = live / "out.faiss"
    embed(world["images"], index, world["package"])
    s = Server("--index", str(index), "--no-ui")
    s.wait_ready()
    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                statuses.append(http.get(f"{s.url}/readyz").status_code)

    def loaded_at() -> float:
        return httpx.get(f"{s.url}/v1/info").json()["index"]["loaded_at"]

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(4):  # a new mtime: the watcher opens the index again (a reload)
            before = loaded_at()
            stamp = time.time_ns() + 10**9
            os.utime(index, ns=(stamp, stamp))
            deadline = time.monotonic() + 30
            while loaded_at() == before:
                assert time.monotonic() < deadline, "no reload"
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        s.stop()
    assert len(statuses) > 100 and set(statuses) == {200}, sorted(set(statuses))


def test_a_reload_error_names_no_server_path(world, model_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    index = live / "out.faiss"
    embed(world["images"], index, world["package"])
    s = Server("--index", str(index), "--no-ui")
    try:
        s.wait_ready()
        staged = tmp_path / "staged"
        staged.mkdir()
        embed(world["images"], staged / "out.faiss", model_dir)  # another model's index
        for old in sorted(live.iterdir()):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        for part in sorted(staged.iterdir(), key=lambda p: p.name == "out.faiss"):
            part.rename(live / part.name)  # the FAISS file last, as embed saves it
        deadline = time.monotonic() + 30
        while not (error := httpx.get(f"{s.url}/v1/info").json()["index"]["reload_error"]):
            assert time.monotonic() < deadline, "the reload was not refused"
            time.sleep(0.1)
        assert "different model" in error and "out.faiss" in error, error
        assert str(tmp_path) not in error and "/" not in error.split(" was ")[0], error
    finally:
        s.stop()
