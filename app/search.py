"""What the app does, without Gradio: search an index by image or by indexed id, thumbnails.

Plain functions and a small class, so tests call them directly; ui.py only wires them up.
No value from a client is ever used as a path: results carry indexed ids, and an id is
resolved through the index's sidecar (`thumbnail`, `search_id`).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mocoserve.core.errors import UserError
from mocoserve.core.images import decode_image
from mocoserve.core.tars import split_item_key
from mocoserve.index.items import ItemGone, item_bytes
from mocoserve.index.reader import Hit, ImageIndex

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 100
THUMBNAIL_PX = 320
log = logging.getLogger("mocoserve.app")


class SearchError(Exception):
    """A problem to show the user as a sentence (not an image, empty index, ...)."""


@dataclass(frozen=True)
class Result:
    """One similar image, as the app shows it: its id, file name, score and label."""

    id: int
    name: str
    score: float
    label: str | None

    @property
    def caption(self) -> str:
        label = f" · {self.label}" if self.label else ""
        return f"{self.score:.3f}{label} · {self.name}"

    def to_dict(self) -> dict[str, Any]:
        """JSON for the API: no server path, only what identifies the item in this index."""
        return asdict(self)


def check_k(k: Any) -> int:
    """k from a client: a whole number from 1 to MAX_K, else a SearchError sentence."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
        raise SearchError(f"k must be a number between 1 and {MAX_K}.")
    if k != int(k) or not 1 <= k <= MAX_K:
        raise SearchError(f"k must be a whole number between 1 and {MAX_K}.")
    return int(k)


def _placeholder(size: int, text: str) -> Image.Image:
    image = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(image).text((8, size // 2 - 6), text, fill=(80, 80, 80))
    return image


class Searcher:
    """An opened index, searched by many requests (thread-safe).

    It may start without one (`index=None`, while a service loads) and take a new one at
    any time (`swap`, after a hot reload); a request uses the index it started with.
    """

    def __init__(self, index: ImageIndex | None, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()  # one SQLite connection and one FAISS index
        self.thumbnail = functools.lru_cache(maxsize=2048)(self._thumbnail)
        self.index: ImageIndex | None = None
        self.ids: list[int] = []
        self.labels: list[str] = []
        self.facts: dict[str, Any] = {}
        if index is not None:
            self.swap(index)

    def swap(self, index: ImageIndex, lock: threading.Lock | None = None) -> None:
        """Search `index` from now on (ids are never reused, so cached thumbnails stay true)."""
        info = index.info()
        facts = {
            "model": Path(info["model"] or "?").name,
            "images": info["items"],
            "dim": info["dim"],
            "index": info["factory"],
            "device": f"{index.encoder.provider} · FAISS {info['search_device']}",
        }
        ids, labels = [int(i) for i in index.ids()], index.labels()
        with self._lock:
            self.ids, self.labels, self.facts = ids, labels, facts
            self.index = index
            if lock is not None:
                self._lock = lock  # the service's lock of this index

    def _current(self) -> ImageIndex:
        index = self.index
        if index is None:
            raise SearchError("The index is still loading; try again in a moment.")
        return index

    def check_label(self, label: Any) -> str | None:
        """A label filter from a client: none, or one of the index's labels."""
        if label in (None, ""):
            return None
        if not isinstance(label, str) or label not in self.labels:
            raise SearchError("That label is not in the index.")
        return label

    def _results(self, hits: list[Hit]) -> list[Result]:
        return [Result(h.id, os.path.basename(h.path), h.score, h.label) for h in hits]

    def search(self, image: str | Path | Image.Image | None, k: Any, label: Any = None):
        """The k most similar indexed images to `image` (an uploaded file or a PIL image)."""
        if image is None or image == "":
            raise SearchError("Upload or paste an image first (or pick a random indexed one).")
        k, label = check_k(k), self.check_label(label)
        index = self._current()
        if len(index) == 0:
            raise SearchError("The index is empty: embed some images into it first.")
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise SearchError("The image could not be read.")
            if path.stat().st_size > self.max_upload_bytes:
                mb = self.max_upload_bytes / 2**20
                raise SearchError(f"The image is larger than {mb:.0f} MB.")
        try:
            vectors = index.embed_images([image])
        except UserError as e:
            reason = str(e).split(": ", 1)[-1]  # drop the temp path of the upload
            raise SearchError(f"That file cannot be used: {reason}.") from None
        with self._lock:
            hits = index.search_vectors(vectors, k, label)[0]
        return self._results(hits)

    def search_id(self, item_id: Any, k: Any, label: Any = None) -> list[Result]:
        """The k most similar indexed images to the indexed image `item_id` (its stored vector)."""
        k, label = check_k(k), self.check_label(label)
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise SearchError("That is not an indexed image.")
        index = self._current()
        with self._lock:
            try:
                hits = index.search_ids([item_id], k, label)[0]
            except UserError:
                raise SearchError("That is not an indexed image.") from None
        return self._results(hits)

    def random_id(self, seed: int | None = None) -> int:
        """An indexed image's id, at random."""
        if not self.ids:
            raise SearchError("The index is empty: embed some images into it first.")
        return random.Random(seed).choice(self.ids)

    def _thumbnail(self, item_id: int, size: int = THUMBNAIL_PX) -> Image.Image:
        """The indexed image `item_id`, decoded by mocoserve and shrunk to `size` px at most.

        The path comes from the sidecar, never from a client; a file that is gone or no
        longer decodes shows as a grey square.
        """
        index = self._current()
        with self._lock:
            item = index.items([item_id]).get(item_id)
        if item is None:
            raise SearchError("That is not an indexed image.")
        try:
            if split_item_key(item.path) is not None:  # a tar member, read at its offset
                image, _ = decode_image(io.BytesIO(item_bytes(item)), draft_size=size)
            elif not os.path.isfile(item.path):
                return _placeholder(size, "missing")
            else:
                image, _ = decode_image(item.path, draft_size=size)
        except ItemGone:
            return _placeholder(size, "missing")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            log.warning("thumbnail of item %d: %s", item_id, type(e).__name__)
            return _placeholder(size, "unreadable")
        image.thumbnail((size, size))
        return image

    def header(self) -> str:
        f = self.facts
        if not f:
            return "**Loading the index…**"
        return (
            f"**{f['images']:,} images** · model `{f['model']}` · {f['dim']}-d · "
            f"index `{f['index']}` · {f['device']}"
        )
