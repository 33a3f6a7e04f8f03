"""Decoding bounded by cost: pixel limits from the header, and a server whose memory stays flat."""

import asyncio
import io
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core.decode import (
    MAX_IMAGE_PIXELS,
    decode_bytes,
    decode_file,
    decode_files,
    read_header,
)
from mocoserve.export.package import export_checkpoint
from mocoserve.service.admission import PixelBudget
from tests.models import make_checkpoint
from tests.test_service import Server

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
HUGE = 13_300  # a solid 13,300^2 PNG: 177 MP, under Pillow's own guard (179 MP), 2 MB of file


def solid_png(side: int, colour: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    """A solid-colour side x side RGB PNG, cached in the temp folder (seconds to make)."""
    name = f"solid-{side}-{'-'.join(map(str, colour))}.png"
    cache = Path(tempfile.gettempdir()) / "mocoserve-tests" / name
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), colour).save(buffer, "PNG", compress_level=1)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.part")
        partial.write_bytes(buffer.getvalue())
        os.replace(partial, cache)  # whole or absent, if tests race
    return cache.read_bytes()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the limit per image, from the header, before decoding ---


def test_an_image_over_the_limit_is_refused_and_one_at_the_limit_decodes(tmp_path):
    data = png(30, 20)  # 600 pixels
    over = decode_bytes(data, 36, 32, max_pixels=599)
    assert over.code == "too_many_pixels" and over.pixels is None
    assert "30 x 20 = 600 pixels, over the limit of 599 per image" in over.error
    assert read_header(data, 36, max_pixels=599).code == "too_many_pixels"
    at = decode_bytes(data, 36, 32, max_pixels=600)
    assert at.error is None and at.pixels.shape == (32, 32, 3)
    assert read_header(data, 36, max_pixels=600).pixels == 600
    # the same limit on embed's path: a recorded failure with its reason
    (tmp_path / "a.png").write_bytes(data)
    assert decode_file(str(tmp_path / "a.png"), 36, 32, max_pixels=599).code == "too_many_pixels"


def test_a_jpeg_costs_what_its_draft_decodes_not_its_full_size():
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1500), (90, 90, 90)).save(buffer, "JPEG")
    header = read_header(buffer.getvalue(), 36)  # draft to >= 144 px: 1/8 scale
    assert header.pixels == 3_000_000 and header.cost == 250 * 188


def test_the_default_limit_refuses_a_huge_cheap_png_before_decoding_it(tmp_path):
    data = solid_png(HUGE)
    assert len(data) < 4_000_000 and HUGE * HUGE > MAX_IMAGE_PIXELS
    started = time.perf_counter()
    refused = decode_bytes(data, 36, 32)
    assert time.perf_counter() - started < 0.5  # a decode takes ~5 s and 700 MB
    assert refused.code == "too_many_pixels"
    assert f"{HUGE * HUGE:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}" in refused.error
    # embed's decoder records it as a failure with the reason
    (tmp_path / "huge.png").write_bytes(data)
    [failed] = decode_files([str(tmp_path / "huge.png")], 36, 32, workers=0)
    assert failed.code == "too_many_pixels" and "over the limit" in failed.error


# --- admission: pixels in flight and threads bounded, first come first served ---


def test_the_pixel_budget_bounds_decodes_in_flight_and_survives_cancellation():
    lock, running, seen = threading.Lock(), [], []

    def job(cost: int) -> int:
        with lock:
            running.append(cost)
            seen.append(list(running))
        time.sleep(0.02)
        with lock:
            running.remove(cost)
        return cost

    async def main() -> None:
        budget = PixelBudget(capacity=100, slots=2)
        with ThreadPoolExecutor(8) as pool:
            costs = [60, 30, 50, 100, 10, 250, 40, 40]
            assert await asyncio.gather(*(budget.run(pool, job, c, cost=c) for c in costs)) == costs
            # a waiter cancelled before it starts gives nothing back and blocks no one
            first = asyncio.ensure_future(budget.run(pool, job, 100, cost=100))
            second = asyncio.ensure_future(budget.run(pool, job, 100, cost=100))
            third = asyncio.ensure_future(budget.run(pool, job, 100, cost=100))
            await asyncio.sleep(0.005)
            second.cancel()
            assert await first == 100 and await third == 100
            assert second.cancelled()
        assert budget.pixels == 0 and budget.running == 0 and budget.waiting == 0

    asyncio.run(main())
    assert max(len(s) for s in seen) == 2  # two slots, used
    assert all(sum(s) <= 100 for s in seen if 250 not in s)
    assert [250] in seen and not any(250 in s and len(s) > 1 for s in seen)  # over: alone


# --- the real server under a load of large images ---


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    return export_checkpoint(make_checkpoint(root / "c.pt"), root / "model", formats=("onnx",)).out


@pytest.mark.parametrize(
    "args",
    [
        ["--max-image-pixels", "0"],
        ["--max-image-pixels", "100000000"],  # above Pillow's own guard, which would refuse first
        ["--max-image-pixels", "2000", "--max-request-pixels", "1000"],
    ],
)
def test_bad_pixel_limits_are_one_line_and_exit_2(package, args):
    result = CliRunner().invoke(app, ["serve", "--model", str(package), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-"), result.output


def test_large_images_are_refused_or_decoded_in_turn_and_a_small_one_is_answered_at_once(package):
    """Per image 20 MP, per request 45 MP; large decodes admitted one at a time.

    Memory bound: one admitted 19.4-MP decode is 78 MB (4 bytes a pixel) and nothing else of
    its size is in memory at once; 200 MB leaves room for the bodies (15 MB, parsed and copied)
    and allocator slack (measured: 85-115 MB). Decoding a 177-MP image takes ~5 s and 700 MB.
    """
    huge, large, tiny = solid_png(HUGE), solid_png(4400), png(40, 40)
    server = Server(
        "--model", str(package), "--no-ui",
        "--max-image-pixels", "20000000", "--max-request-pixels", "45000000",
    )  # fmt: skip
    try:
        server.wait_ready()
        url = f"{server.url}/v1/embed"

        def post(*images: bytes) -> tuple[httpx.Response, float]:
            files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
            response = httpx.post(url, files=files, timeout=120)
            return response, time.monotonic()

        assert post(tiny)[0].status_code == 200  # warm: the model's first call, the pool
        pid = server.proc.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, the peak from now
        before = vm_kb(pid, "VmHWM")
        with ThreadPoolExecutor(8) as pool:
            bombs = [pool.submit(post, huge, huge, tiny) for _ in range(3)]
            bigs = [pool.submit(post, large) for _ in range(3)]
            over = pool.submit(post, large, large, large)
            time.sleep(0.5)  # all of them at the server
            sent = time.monotonic()
            small, small_done = post(tiny)
            small_seconds = small_done - sent
            results = [f.result() for f in [*bombs, *bigs, over]]
        peak_mb = (vm_kb(pid, "VmHWM") - before) / 1024
        assert small.status_code == 200 and small.json()["errors"] == [None]
        for response, _ in results[:3]:
            body = response.json()
            assert response.status_code == 200 and body["embeddings"][2] is not None
            assert [e and e["code"] for e in body["errors"]] == [
                "too_many_pixels",
                "too_many_pixels",
                None,
            ]
        for response, _ in results[3:6]:
            assert response.status_code == 200 and response.json()["errors"] == [None]
        response = results[6][0]
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"
        assert "58.1 MP together; at most 45.0 MP" in response.json()["error"]["message"]
        # the small request did not queue behind the large decodes
        assert small_seconds < 3, small_seconds  # behind the 177-MP decodes: 10 s and more
        assert peak_mb < 200, f"the server's peak memory grew by {peak_mb:.0f} MB"
    finally:
        server.stop()
    assert "Traceback" not in server.err, server.err
