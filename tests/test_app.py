"""The Gradio app: `search` directly, the API through gradio_client, hostile clients, browser."""

import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from PIL import Image

import mocoserve.index.reader
from mocoserve.app.search import MAX_K, Searcher, SearchError, check_k
from mocoserve.app.ui import ANY_LABEL, build_app, launch_options
from mocoserve.ingest.embed import embed_folders
from tests.imagegen import class_image, make_labelled
from tests.procs import default_sigint

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET_SIZE = (123, 77)  # a size no indexed or generated image has


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def client_temp_dir(tmp_path_factory):
    """gradio_client makes a temp folder per file it handles; keep them out of /tmp."""
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("gradio-client"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A private photo and a note outside every indexed folder."""
    folder = tmp_path_factory.mktemp("private")
    class_image(4, 1, size=200).resize(SECRET_SIZE).save(folder / "photo.png")
    (folder / "notes.txt").write_text("the combination is 12-34-56\n")
    return folder


@pytest.fixture(scope="module")
def linked_target(tmp_path_factory) -> Path:
    """A folder elsewhere, linked into the indexed folder: its image is indexed, its note not."""
    folder = tmp_path_factory.mktemp("elsewhere")
    class_image(1, 41).save(folder / "pic.png")
    (folder / "notes.txt").write_text("not an image, never indexed\n")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory, labelled_dir, linked_target) -> Path:
    """The labelled folder, a subfolder, and a symlinked folder that points outside it."""
    root = tmp_path_factory.mktemp("indexed") / "data"
    shutil.copytree(labelled_dir, root)
    (root / "class_2" / "up").mkdir()
    class_image(2, 40).save(root / "class_2" / "up" / "linked.png")
    (root / "class_1" / "elsewhere").symlink_to(linked_target, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, images, model_dir) -> Path:
    index = tmp_path_factory.mktemp("app") / "out.faiss"
    embed_folders([images], model_dir, index, workers=0, labels_from_folders=True)
    return index


@pytest.fixture(scope="module")
def searcher(indexed) -> Searcher:
    return Searcher(mocoserve.index.reader.open(indexed))


@pytest.fixture(scope="module")
def url(searcher):
    blocks = build_app(searcher)
    blocks.queue(default_concurrency_limit=2, max_size=256)
    _, local_url, _ = blocks.launch(
        **launch_options(searcher, port=free_port()), prevent_thread_lock=True
    )
    yield local_url.rstrip("/")
    blocks.close()


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if "elsewhere" not in p.parts) + sorted(
        folder.rglob("*.jpg")
    )


def id_of(searcher: Searcher, path: Path) -> int:
    for item in searcher.index.items(searcher.ids).values():
        if item.path == str(path):
            return item.id
    raise KeyError(path)


def test_search_finds_each_indexed_image_first(searcher, images):
    for path in files(images):
        results = searcher.search(str(path), 3)
        assert results[0].id == id_of(searcher, path) and results[0].name == path.name
        assert results[0].score == pytest.approx(1, abs=1e-4) and len(results) == 3
        assert set(results[0].to_dict()) == {"id", "name", "score", "label"}  # no path


def test_search_by_id_label_filter_and_random(searcher, images):
    query = files(images)[0]
    own = id_of(searcher, query)
    by_id = searcher.search_id(own, 5)
    assert by_id[0].id == own and by_id[0].score == pytest.approx(1, abs=1e-5)
    assert [r.id for r in by_id] == [r.id for r in searcher.search(str(query), 5)]
    only = searcher.search(str(query), 5, "class_2")
    assert only and {r.label for r in only} == {"class_2"}
    assert searcher.random_id(seed=1) in searcher.ids
    assert "26 images" in searcher.header()
    thumb = searcher.thumbnail(own)
    assert isinstance(thumb, Image.Image) and max(thumb.size) <= 320


def test_hostile_arguments_are_sentences(searcher, images, tmp_path, model_dir):
    query = str(files(images)[0])
    for k in ("abc", 1e9, -1, 0, 2.5, True, None, float("nan"), [3]):
        with pytest.raises(SearchError, match="k must be"):
            searcher.search(query, k)
    assert check_k(MAX_K) == MAX_K and check_k(3.0) == 3
    for label in ("no-such-label", 5, ["class_1"], {"a": 1}):
        with pytest.raises(SearchError, match="label is not in the index"):
            searcher.search(query, 5, label)
    for item_id in (10**9, -1, "3", None, 2.0):
        with pytest.raises(SearchError, match="not an indexed image"):
            searcher.search_id(item_id, 5)
    with pytest.raises(SearchError, match="Upload or paste"):
        searcher.search(None, 5)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(SearchError, match="cannot be used: not an image"):
        searcher.search(str(text), 5)
    big = tmp_path / "big.png"
    class_image(0, 0, size=300).save(big)
    with pytest.raises(SearchError, match="larger than"):
        Searcher(searcher.index, max_upload_bytes=1000).search(str(big), 5)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no images here")
    embed_folders([tmp_path / "nothing"], model_dir, tmp_path / "empty.faiss", workers=0)
    empty = mocoserve.index.reader.open(tmp_path / "empty.faiss")
    with pytest.raises(SearchError, match="empty"):
        Searcher(empty).search(str(big), 5)


def test_api_search_through_gradio_client(url, images, tmp_path):
    client = Client(url, verbose=False, download_files=str(tmp_path))
    query = files(images)[5]
    gallery, results, status = client.predict(
        handle_file(str(query)), 4, ANY_LABEL, api_name="/search"
    )
    assert results[0]["name"] == query.name and len(results) == 4
    assert all(set(r) == {"id", "name", "score", "label"} for r in results)
    assert str(images) not in json.dumps([gallery, results, status])  # no server path
    assert len(gallery) == 4 and query.name in gallery[0]["caption"]
    assert "4 most similar of 26" in status
    _, only, _ = client.predict(handle_file(str(query)), 3, "class_1", api_name="/search")
    assert {r["label"] for r in only} == {"class_1"}


def test_api_errors_are_messages_not_tracebacks(url, tmp_path):
    client = Client(url, verbose=False, download_files=False)
    text = tmp_path / "fake.png"
    text.write_text("hello")
    with pytest.raises(Exception) as error:
        client.predict(handle_file(str(text)), 4, ANY_LABEL, api_name="/search")
    assert "cannot be used" in str(error.value) and "Traceback" not in str(error.value)


# --- hostile clients: every event handler, forged inputs, files by path ---


def queue_call(url: str, fn_index: int, data: list, event_data=None, trigger_id=None) -> dict:
    """Post one event to Gradio's queue as a client can; the final message it streamed."""
    session = f"hostile{fn_index}{time.monotonic_ns()}"
    body = {
        "data": data,
        "event_data": event_data,
        "fn_index": fn_index,
        "trigger_id": trigger_id,
        "session_hash": session,
    }
    joined = httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=30)
    if joined.status_code != 200:
        return {"refused": joined.status_code, "body": joined.text}
    with httpx.stream(
        "GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and '"process_completed"' in line:
                message = json.loads(line[5:])
                return {"success": message["success"], "output": message["output"]}
    raise AssertionError("the queue closed without an answer")


def forged_values(component: dict, photo: str) -> list:
    """What a hostile client can put in one input of a given component type."""
    file_data = {"path": photo, "meta": {"_type": "gradio.FileData"}, "orig_name": "p.png"}
    kind = component["type"]
    if kind == "image":
        return [file_data, photo]
    if kind == "state":
        forged = [{"file": photo, "path": photo, "id": 1}]
        return [[forged, 5, ANY_LABEL], [10**9], [photo]]
    if kind == "slider":
        return ["abc", 10**9, 3]
    if kind == "dropdown":
        return [f"../../{photo}", 7, ANY_LABEL]
    if kind == "json":
        return [[{"file": photo}]]
    return [photo]


def test_every_event_handler_refuses_forged_inputs(url, secret):
    """Every registered handler (by fn_index, named or not), forged inputs and event data.

    A forged path to the private photo must get the very answer a path to nothing gets (no
    existence oracle), nothing of the private folder may reach the answer or Gradio's files.
    """
    config = httpx.get(f"{url}/config").json()
    components = {c["id"]: c for c in config["components"]}
    dependencies = config["dependencies"]
    assert len(dependencies) >= 4  # search, upload, random, gallery click
    started = time.time()
    photo, nothing = str(secret / "photo.png"), str(secret / "nothing-here.png")

    def answer(fn_index: int, dep: dict, variant: int, path: str, event: dict) -> str:
        event = json.loads(json.dumps(event).replace(photo, path))
        data = []
        for c in (components[i] for i in dep["inputs"]):
            values = forged_values(c, path)
            data.append(values[variant % len(values)])
        trigger = dep["targets"][0][0] if dep["targets"] else None
        reply = queue_call(url, fn_index, data, event, trigger)
        text = json.dumps(reply)
        assert "12-34-56" not in text and "Traceback" not in text
        # what could tell the two paths apart: success, and the refusal's words
        verdict = {k: reply.get(k) for k in ("success", "refused")}
        verdict["error"] = (reply.get("output") or {}).get("error")
        return json.dumps(verdict).replace(path, "<P>")

    calls = 0
    for fn_index, dep in enumerate(dependencies):
        inputs = [components[i] for i in dep["inputs"]]
        variants = max([len(forged_values(c, photo)) for c in inputs] or [1])
        for variant in range(variants):
            for event in (
                {"index": 0, "value": {"image": {"path": photo}, "caption": "x"}},
                {"index": "0"},
                {"index": 10**6},
            ):
                existing = answer(fn_index, dep, variant, photo, event)
                missing = answer(fn_index, dep, variant, nothing, event)
                assert existing == missing, (fn_index, existing, missing)
                calls += 1
    assert calls >= 20
    for f in Path(gradio_utils.get_upload_folder()).rglob("*"):
        if f.is_file() and f.stat().st_mtime >= started:
            assert b"12-34-56" not in f.read_bytes()
            try:
                with Image.open(f) as img:
                    assert img.size != SECRET_SIZE, f"the private photo leaked into {f}"
            except OSError:
                pass


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET a path as written (http.client sends it raw; httpx would normalise `..`)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_no_file_is_served_by_its_path(url, images, secret, linked_target, model_dir):
    inside = files(images)[0]
    targets = [
        str(inside),  # indexed files are shown as thumbnails, by id, never by path
        str(images / "class_1" / "elsewhere" / "notes.txt"),  # through the symlinked folder
        str(linked_target / "notes.txt"),  # the symlink's target folder
        str(linked_target / "pic.png"),
        str(secret / "notes.txt"),
        str(secret / "photo.png"),
        "/etc/passwd",
        str(model_dir / "manifest.json"),
        f"{images}/../../etc/passwd",
        f"{images}/class_0/../../{model_dir.parent.name}/model/manifest.json",
        f"{images}/%2e%2e/%2e%2e/etc/passwd",
        str(ROOT / "pyproject.toml"),
        "http://127.0.0.1:1/x.png",
        "https://example.com/cat.png",
    ]
    for target in targets:
        status, body = raw_get(url, f"/gradio_api/file={target}")
        assert status == 403, (target, status, body[:200])
        assert body == b'{"detail": "This file is not served."}', (target, body[:200])


def test_symlinked_folder_items_show_as_thumbnails(searcher, images):
    linked = images / "class_1" / "elsewhere" / "pic.png"
    item = id_of(searcher, linked)  # indexed: it was under the folder given to embed
    assert searcher.thumbnail(item).size == (40, 40)


def test_fifty_concurrent_searches_all_succeed(url, images):
    client = Client(url, verbose=False, download_files=False)
    queries = files(images)

    def one(i: int) -> float:
        start = time.perf_counter()
        query = queries[i % len(queries)]
        _, results, _ = client.predict(handle_file(str(query)), 5, ANY_LABEL, api_name="/search")
        assert results[0]["name"] == query.name
        return time.perf_counter() - start

    with ThreadPoolExecutor(50) as pool:
        latencies = sorted(pool.map(one, range(50)))
    assert len(latencies) == 50
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n50 concurrent searches: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser(url, images):
    from playwright.sync_api import expect, sync_playwright

    query = files(images)[2]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#facts")).to_contain_text("26 images", timeout=30_000)
            page.locator("#query input[type=file]").set_input_files(str(query))
            captions = page.locator("#results .caption-label")
            expect(captions.first).to_contain_text(query.name, timeout=30_000)
            second = captions.nth(1).inner_text()
            assert second and query.name not in second
            page.locator("#results button.thumbnail-item").nth(1).click()
            expect(captions.first).to_contain_text(second.split(" · ")[-1], timeout=30_000)
            page.locator("#random").click()
            expect(page.locator("#status")).to_contain_text("most similar of 26", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app-search.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "app-search.png").stat().st_size > 10_000


# --- `mocoserve app` itself ---


def listening_address(port: int) -> str | None:
    """The local address a TCP socket listens on for `port` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


def test_the_app_command_with_auth_on_loopback(indexed, images, tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    cmd = [sys.executable, "-m", "mocoserve", "app", "--index", str(indexed)]
    cmd += ["--port", str(port), "--auth", "alice:s3cret"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,  # it is stopped with Ctrl-C
    )
    try:
        deadline = time.time() + 120
        while listening_address(port) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the app did not start"
            time.sleep(0.2)
        assert listening_address(port) == "127.0.0.1"  # loopback unless --host says otherwise
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/config").status_code in (401, 403)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own kinds
            Client(url, verbose=False, auth=("alice", "wrong"))
        client = Client(url, verbose=False, auth=("alice", "s3cret"), download_files=False)
        query = files(images)[1]
        _, results, _ = client.predict(handle_file(str(query)), 3, ANY_LABEL, api_name="/search")
        assert results[0]["name"] == query.name
        for k, label in [("abc", ANY_LABEL), (10**6, ANY_LABEL), (3, "no-such-label")]:
            with pytest.raises(Exception) as error:
                client.predict(handle_file(str(query)), k, label, api_name="/search")
            assert "Traceback" not in str(error.value)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert f"serving on http://127.0.0.1:{port}" in out
    assert "Traceback" not in err, err
    refusals = [line for line in err.splitlines() if line.startswith("mocoserve.app: refused")]
    assert len(refusals) == 3, err


def test_app_command_refuses_bad_arguments(tmp_path, indexed):
    from typer.testing import CliRunner

    from mocoserve.cli import app as cli

    runner = CliRunner()
    bad_auth = runner.invoke(cli, ["app", "--index", str(indexed), "--auth", "nopassword"])
    assert bad_auth.exit_code == 2 and "user:password" in bad_auth.output
    missing = runner.invoke(cli, ["app", "--index", str(tmp_path / "none.faiss")])
    assert missing.exit_code == 2 and "not an index" in missing.output


def test_an_app_on_a_new_folder_layout(tmp_path, model_dir):
    """Labels are optional: a flat folder's app has no label filter and still searches."""
    root = make_labelled(tmp_path / "flat", classes=1, per_class=4)
    index = tmp_path / "flat.faiss"
    embed_folders([root], model_dir, index, workers=0)
    searcher = Searcher(mocoserve.index.reader.open(index))
    assert searcher.labels == []
    query = sorted(root.rglob("*.png"))[0]
    assert searcher.search(str(query), 2)[0].name == query.name
