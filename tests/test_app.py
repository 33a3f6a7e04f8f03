"""The Gradio app: `search` directly, the API through gradio_client, security, load, browser."""

import os
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

import mocoserve.index
from mocoserve.app.search import Searcher, SearchError, indexed_roots
from mocoserve.app.ui import ANY_LABEL, build_app, launch_options
from mocoserve.embed import embed_folders
from tests.imagegen import class_image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
def indexed(tmp_path_factory, labelled_dir, model_dir) -> Path:
    index = tmp_path_factory.mktemp("app") / "out.faiss"
    embed_folders([labelled_dir], model_dir, index, workers=0, labels_from_folders=True)
    return index


@pytest.fixture(scope="module")
def searcher(indexed) -> Searcher:
    return Searcher(mocoserve.index.open(indexed))


@pytest.fixture(scope="module")
def url(searcher):
    blocks = build_app(searcher)
    blocks.queue(default_concurrency_limit=2, max_size=256)
    _, local_url, _ = blocks.launch(
        **launch_options(searcher, port=free_port()), prevent_thread_lock=True
    )
    yield local_url.rstrip("/")
    blocks.close()


def files(labelled_dir: Path) -> list[Path]:
    return sorted(p for p in labelled_dir.rglob("*.*"))


def test_search_finds_each_indexed_image_first(searcher, labelled_dir):
    for path in files(labelled_dir):
        results = searcher.search(str(path), 3)
        assert results[0].path == str(path) and results[0].score == pytest.approx(1, abs=1e-4)
        assert results[0].label == path.parent.name and results[0].name == path.name
        assert len(results) == 3


def test_search_label_filter_and_random(searcher, labelled_dir):
    query = files(labelled_dir)[0]
    results = searcher.search(str(query), 5, "class_2")
    assert results and {r.label for r in results} == {"class_2"}
    assert searcher.search(str(query), 5, "no-such-label")[0].path == str(query)
    assert searcher.random_path(seed=1) in searcher.paths
    assert "24 images" in searcher.header()


def test_search_errors_are_sentences(searcher, tmp_path, model_dir):
    with pytest.raises(SearchError, match="Upload or paste"):
        searcher.search(None, 5)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(SearchError, match="cannot be used: not an image"):
        searcher.search(str(text), 5)
    with pytest.raises(SearchError, match="k must be"):
        searcher.search(str(text), 0)
    big = tmp_path / "big.png"
    class_image(0, 0, size=300).save(big)
    small_limit = Searcher(searcher.index, max_upload_bytes=1000)
    with pytest.raises(SearchError, match="larger than"):
        small_limit.search(str(big), 5)
    empty = mocoserve.index.open(tmp_path / "empty.faiss", model=model_dir, create=True)
    empty.ingest([], [], 8, 0)
    with pytest.raises(SearchError, match="empty"):
        Searcher(empty).search(str(big), 5)


def test_indexed_roots_are_the_fewest_folders():
    paths = ["/a/b/1.png", "/a/b/c/2.png", "/a/bc/3.png", "/x/4.png"]
    assert indexed_roots(paths) == ["/a/b", "/a/bc", "/x"]


def test_api_search_through_gradio_client(url, labelled_dir, tmp_path):
    client = Client(url, verbose=False, download_files=str(tmp_path))
    query = files(labelled_dir)[5]
    gallery, results, status = client.predict(
        handle_file(str(query)), 4, ANY_LABEL, api_name="/search"
    )
    assert results[0]["file"] == str(query) and len(results) == 4
    assert len(gallery) == 4 and query.name in gallery[0]["caption"]
    assert "4 most similar of 24" in status
    _, only, _ = client.predict(handle_file(str(query)), 3, "class_1", api_name="/search")
    assert {r["label"] for r in only} == {"class_1"}


def test_api_errors_are_messages_not_tracebacks(url, tmp_path):
    client = Client(url, verbose=False, download_files=False)
    text = tmp_path / "fake.png"
    text.write_text("hello")
    with pytest.raises(Exception) as error:
        client.predict(handle_file(str(text)), 4, ANY_LABEL, api_name="/search")
    assert "cannot be used" in str(error.value) and "Traceback" not in str(error.value)


def test_only_indexed_files_are_served(url, labelled_dir, model_dir):
    inside = files(labelled_dir)[0]
    assert httpx.get(f"{url}/gradio_api/file={inside}").status_code == 200
    outside = [
        "/etc/passwd",
        str(model_dir / "manifest.json"),
        f"{labelled_dir}/../../etc/passwd",
        f"{labelled_dir}/class_0/../../{model_dir.parent.name}/model/manifest.json",
        f"{labelled_dir}/%2e%2e/%2e%2e/etc/passwd",
        str(ROOT / "pyproject.toml"),
    ]
    for path in outside:
        response = httpx.get(f"{url}/gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "root:" not in response.text


def test_fifty_concurrent_searches_all_succeed(url, labelled_dir):
    # the server's latency: result images are not downloaded (a browser fetches them lazily)
    client = Client(url, verbose=False, download_files=False)
    queries = files(labelled_dir)

    def one(i: int) -> float:
        start = time.perf_counter()
        query = queries[i % len(queries)]
        _, results, _ = client.predict(handle_file(str(query)), 5, ANY_LABEL, api_name="/search")
        assert results[0]["file"] == str(query)
        return time.perf_counter() - start

    with ThreadPoolExecutor(50) as pool:
        latencies = sorted(pool.map(one, range(50)))
    assert len(latencies) == 50
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(f"\n50 concurrent searches: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_page_in_a_real_browser(url, labelled_dir):
    from playwright.sync_api import expect, sync_playwright

    query = files(labelled_dir)[2]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#facts")).to_contain_text("24 images", timeout=30_000)
            page.locator("#query input[type=file]").set_input_files(str(query))
            captions = page.locator("#results .caption-label")
            expect(captions.first).to_contain_text(query.name, timeout=30_000)
            second = captions.nth(1).inner_text()
            assert second and query.name not in second
            page.locator("#results button.thumbnail-item").nth(1).click()
            expect(captions.first).to_contain_text(second.split(" · ")[-1], timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app-search.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "app-search.png").stat().st_size > 10_000


def test_app_command_refuses_bad_arguments(tmp_path, indexed):
    from typer.testing import CliRunner

    from mocoserve.cli import app as cli

    runner = CliRunner()
    bad_auth = runner.invoke(cli, ["app", "--index", str(indexed), "--auth", "nopassword"])
    assert bad_auth.exit_code == 2 and "user:password" in bad_auth.output
    missing = runner.invoke(cli, ["app", "--index", str(tmp_path / "none.faiss")])
    assert missing.exit_code == 2 and "not an index" in missing.output
