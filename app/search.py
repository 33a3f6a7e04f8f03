"""What the app does, without Gradio: search an index with an image, pick a random one.

Plain functions and a small class, so tests call them directly; ui.py only wires them up.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mocoserve.core.errors import UserError
from mocoserve.index import ImageIndex

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 100


class SearchError(Exception):
    """A problem to show the user as a sentence (not an image, empty index, ...)."""


@dataclass(frozen=True)
class Result:
    """One similar image, as the app shows it."""

    path: str
    name: str
    score: float
    label: str | None
    id: int

    @property
    def caption(self) -> str:
        label = f" · {self.label}" if self.label else ""
        return f"{self.score:.3f}{label} · {self.name}"

    def to_dict(self) -> dict[str, Any]:
        """JSON for the API; `file`, not `path`: Gradio treats any {"path": ...} as a file."""
        d = asdict(self)
        d["file"] = d.pop("path")
        return d


def indexed_roots(paths: list[str]) -> list[str]:
    """The fewest folders that hold every indexed file (what the app may serve)."""
    roots: list[str] = []
    for folder in sorted({os.path.dirname(p) for p in paths}):
        if not roots or not (folder == roots[-1] or folder.startswith(roots[-1] + os.sep)):
            roots.append(folder)
    return roots


class Searcher:
    """An index opened once, searched by many requests (thread-safe)."""

    def __init__(self, index: ImageIndex, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.index = index
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()  # one SQLite connection and one FAISS index
        self.paths = index.sidecar.paths()
        self.roots = indexed_roots(self.paths)
        self.labels = index.sidecar.labels()
        info = index.info()
        self.facts = {
            "model": Path(info["model"] or "?").name,
            "images": info["items"],
            "dim": info["dim"],
            "index": info["factory"],
            "device": f"{index.encoder.provider} · FAISS {info['search_device']}",
        }

    def search(self, image: str | Path | Image.Image | None, k: int, label: str | None = None):
        """The k most similar indexed images to `image` (a file path or a PIL image)."""
        if image is None or image == "":
            raise SearchError("Upload or paste an image first (or pick a random indexed one).")
        if len(self.index) == 0:
            raise SearchError("The index is empty: embed some images into it first.")
        k = int(k)
        if not 1 <= k <= MAX_K:
            raise SearchError(f"k must be between 1 and {MAX_K}.")
        if label in ("", None) or label not in self.labels:
            label = None
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise SearchError("The image could not be read.")
            if path.stat().st_size > self.max_upload_bytes:
                mb = self.max_upload_bytes / 2**20
                raise SearchError(f"The image is larger than {mb:.0f} MB.")
        try:
            vectors = self.index.embed_images([image])
        except UserError as e:
            reason = str(e).split(": ", 1)[-1]  # drop the temp path of the upload
            raise SearchError(f"That file cannot be used: {reason}.") from None
        with self._lock:
            hits = self.index.search_vectors(vectors, k, label)[0]
        return [Result(h.path, os.path.basename(h.path), h.score, h.label, h.id) for h in hits]

    def random_path(self, seed: int | None = None) -> str:
        """An indexed image, at random."""
        if not self.paths:
            raise SearchError("The index is empty: embed some images into it first.")
        return random.Random(seed).choice(self.paths)

    def header(self) -> str:
        f = self.facts
        return (
            f"**{f['images']:,} images** · model `{f['model']}` · {f['dim']}-d · "
            f"index `{f['index']}` · {f['device']}"
        )
