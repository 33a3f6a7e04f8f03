"""An image index: a FAISS file (`out.faiss`) and its SQLite sidecar (`out.faiss.db`).

    import mocoserve.index
    index = mocoserve.index.open("out.faiss")
    hits = index.search_images(["query.jpg"], k=10)[0]

The sidecar holds every item with its vector and is committed batch by batch; the FAISS
file is derived from it, patched or rebuilt to hold exactly the sidecar's ids, and
written atomically. Opening checks that the two agree and repairs the in-memory index
from the sidecar when a run was killed between its last commit and the index write.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from mocoserve import vectors as vec
from mocoserve.core.errors import UserError
from mocoserve.decode import Decoded, decode_file, decode_files
from mocoserve.model import PackageEncoder, load, resize_crop, sha256_file, to_input
from mocoserve.sidecar import Item, NewItem, Sidecar

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float
    path: str
    label: str | None
    sha256: str
    width: int
    height: int
    is_query: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestCounts:
    """What one pass of embedding did."""

    embedded: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] | None = None


def sidecar_path(index_path: str | Path) -> Path:
    return Path(f"{index_path}.db")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of a package's manifest.json (which lists every file's sha256)."""
    return sha256_file(Path(model_dir) / "manifest.json")


def labelled_by_folders(index_path: str | Path) -> bool:
    """Whether an existing index was labelled from folder names (False for a new one)."""
    db = sidecar_path(index_path)
    if not db.is_file():
        return False
    sidecar = Sidecar(db, readonly=True)
    try:
        return sidecar.get_meta("labels") == "folders" or (
            sidecar.get_meta("labels") is None and bool(sidecar.labels())
        )
    finally:
        sidecar.close()


@contextmanager
def writer_lock(index_path: str | Path):
    """One writer per index: a second `embed` on the same index fails fast."""
    fd = os.open(f"{index_path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{index_path} is being written by another process") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ImageIndex:
    """Search, add and remove images; see the module docstring."""

    def __init__(
        self,
        path: Path,
        sidecar: Sidecar,
        model_dir: Path | None,
        device: str,
        backend: str,
        flat_limit: int,
        readonly: bool = False,
    ) -> None:
        self.path = path
        self.readonly = readonly  # a reader: repairs in memory only, never writes a file
        self.sidecar = sidecar
        self.model_dir = model_dir
        self.device = device
        self.backend = backend
        self.flat_limit = flat_limit
        self.dim = int(sidecar.get_meta("dim") or 0)
        self._encoder: PackageEncoder | None = None
        self.index: faiss.IndexIDMap2 | None = None
        self.repaired = False  # True when the file on disk did not agree with the sidecar
        if self.dim:
            index = vec.read(path, self.dim)
            if index is not None and self._kind_ok(index):
                self.index, self.repaired = index, self._sync(index) > 0
            else:
                self._rebuild()
                self.repaired = True
        nprobe = sidecar.get_meta("nprobe")
        self.nprobe = int(nprobe) if nprobe else None
        if self.index is not None:
            vec.set_search_params(self.index, self.nprobe)
        self._searcher: vec.Searcher | None = None

    # facts
    def __len__(self) -> int:
        return len(self.sidecar)

    @property
    def factory(self) -> str:
        return self.sidecar.get_meta("factory") or "Flat"

    @property
    def searcher(self) -> vec.Searcher:
        if self._searcher is None:
            if self.index is None:
                raise UserError(f"{self.path} is empty: nothing has been embedded yet")
            self._searcher = vec.Searcher(self.index, self.nprobe, self.device)
        return self._searcher

    @property
    def encoder(self) -> PackageEncoder:
        """The model package, loaded once, checked against the one the index was built with."""
        if self._encoder is None:
            if self.model_dir is None or not Path(self.model_dir).is_dir():
                raise UserError(
                    f"the model package of {self.path} ({self.model_dir}) is not there; "
                    "pass --model"
                )
            encoder = load(self.model_dir, self.backend, self.device)
            self._check_model(model_fingerprint(self.model_dir), encoder.embedding_dim)
            self._encoder = encoder
        return self._encoder

    def attach(self, encoder: PackageEncoder) -> None:
        """Use an already loaded (and verified) package; it must be the index's model."""
        self._check_model(model_fingerprint(encoder.path), encoder.embedding_dim)
        self._encoder = encoder

    def info(self) -> dict[str, Any]:
        """Facts for headers and reports."""
        meta = self.sidecar.meta()
        return {
            "index": str(self.path),
            "items": len(self),
            "dim": self.dim,
            "factory": self.factory,
            "nprobe": self.nprobe,
            "model": meta.get("model_path"),
            "model_sha256": meta.get("model_sha256"),
            "labels": self.sidecar.labels(),
            "search_device": self.searcher.device if self.index is not None else "cpu",
        }

    # search
    def search_vectors(
        self, queries: np.ndarray, k: int = 10, label: str | None = None
    ) -> list[list[Hit]]:
        """Nearest items to each query vector (normalised here), best first."""
        queries = vec.normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise UserError(f"queries are {queries.shape[1]}-d, the index is {self.dim}-d")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return [[] for _ in queries]
        if label is None:
            scores, ids = self.searcher.search(queries, k)
        else:
            scores, ids = self._search_label(queries, k, label)
        items = self.sidecar.items(np.unique(ids[ids >= 0]))
        return [
            [
                Hit(int(i), float(s), **_item_fields(items[int(i)]))
                for s, i in zip(row_s, row_i, strict=True)
                if i >= 0 and int(i) in items
            ]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    def _search_label(self, queries: np.ndarray, k: int, label: str):
        allowed = self.sidecar.ids_with_label(label)
        if len(allowed) == 0:
            empty = np.full((len(queries), k), -1, dtype=np.int64)
            return np.zeros((len(queries), k), dtype=np.float32), empty
        selector = faiss.IDSelectorBatch(allowed)
        ivf = vec.base_ivf(self.index)
        params = (
            faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe or ivf.nprobe)
            if ivf is not None
            else faiss.SearchParameters(sel=selector)
        )
        return self.index.search(queries, min(k, len(allowed)), params=params)

    def embed_images(self, images: Sequence[str | Path | Image.Image]) -> np.ndarray:
        """Embed query images (paths or PIL images); a bad file is a UserError."""
        return self._embed_queries(images)[0]

    def _embed_queries(
        self, images: Sequence[str | Path | Image.Image]
    ) -> tuple[np.ndarray, list[str | None]]:
        """Vectors and, for files, their sha256 (hashed as they are read)."""
        encoder = self.encoder
        batch, hashes = [], []
        for image in images:
            if isinstance(image, Image.Image):
                batch.append(np.asarray(resize_crop(image, encoder.resize, encoder.input_size)))
                hashes.append(None)
                continue
            decoded = decode_file(str(image), encoder.resize, encoder.input_size)
            if decoded.error:
                raise UserError(f"{image}: {decoded.error}")
            batch.append(decoded.pixels)
            hashes.append(decoded.sha256)
        return encoder.embed(to_input(np.stack(batch))), hashes

    def search_images(
        self, images: Sequence[str | Path | Image.Image], k: int = 10, label: str | None = None
    ) -> list[list[Hit]]:
        """Nearest items to each query image; a hit on the query's own file is flagged."""
        vectors, hashes = self._embed_queries(images)
        results = self.search_vectors(vectors, k, label)
        flagged = []
        for image, own_sha, hits in zip(images, hashes, results, strict=True):
            own_path = None if isinstance(image, Image.Image) else os.path.abspath(image)
            flagged.append(
                [
                    Hit(**{**h.to_dict(), "is_query": h.path == own_path or h.sha256 == own_sha})
                    for h in hits
                ]
            )
        return flagged

    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        """id -> Item (path, label, sha256, size...) for the ids that are in the index."""
        return self.sidecar.items(ids)

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of these ids, in the order given; an unknown id is a UserError."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        found: dict[int, np.ndarray] = {}
        for block_ids, block in self.sidecar.vectors(np.unique(wanted)):
            found.update(zip(block_ids.tolist(), block, strict=True))
        missing = [int(i) for i in wanted if int(i) not in found]
        if missing:
            raise UserError(f"no item with id {missing[0]} in {self.path}")
        if len(wanted) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[int(i)] for i in wanted]).astype(np.float32, copy=False)

    def search_ids(
        self, ids: Sequence[int], k: int = 10, label: str | None = None
    ) -> list[list[Hit]]:
        """Nearest items to indexed items (by their stored vectors); each item's own hit flagged."""
        results = self.search_vectors(self.vectors_of(ids), k, label)
        return [
            [Hit(**{**h.to_dict(), "is_query": h.id == int(own)}) for h in hits]
            for own, hits in zip(ids, results, strict=True)
        ]

    # changes
    def add(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[str | None] | None = None,
        batch_size: int = 64,
        workers: int = 0,
    ) -> IngestCounts:
        """Embed these files (replacing any with the same path) and save the index."""
        with writer_lock(self.path):
            counts = self.ingest(
                [os.path.abspath(p) for p in paths],
                list(labels) if labels is not None else [None] * len(paths),
                batch_size,
                workers,
            )
            self.save()
        return counts

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Remove these files from the index and save it; how many were there."""
        self._writable()
        with writer_lock(self.path):
            removed = self.sidecar.remove_paths(os.path.abspath(p) for p in paths)
            self.save()
        return removed

    def ingest(
        self,
        paths: Sequence[str],
        labels: Sequence[str | None],
        batch_size: int,
        workers: int,
        progress: ProgressFn | None = None,
    ) -> IngestCounts:
        """Decode, embed and commit files to the sidecar batch by batch (no index write)."""
        self._writable()
        encoder = self.encoder
        self._ensure_meta(encoder)
        label_of = dict(zip(paths, labels, strict=True))
        counts = IngestCounts(failures=[])
        ready: list[Decoded] = []
        failed: list[tuple[str, str]] = []

        def flush() -> None:
            vectors = (
                vec.normalize(encoder.embed(to_input(np.stack([d.pixels for d in ready]))))
                if ready
                else np.zeros((0, self.dim), dtype=np.float32)
            )
            added = [
                NewItem(d.path, label_of[d.path], d.sha256, d.bytes, d.mtime, d.width, d.height, v)
                for d, v in zip(ready, vectors, strict=True)
            ]
            self.sidecar.commit_batch(added, failed)
            counts.embedded += len(added)
            counts.failed += len(failed)
            counts.failures.extend(failed)
            if progress is not None:
                progress(len(added) + len(failed))
            ready.clear()
            failed.clear()

        for decoded in decode_files(paths, encoder.resize, encoder.input_size, workers):
            if decoded.error:
                failed.append((decoded.path, decoded.error))
            else:
                ready.append(decoded)
            if len(ready) >= batch_size:
                flush()
        flush()
        return counts

    def _writable(self) -> None:
        if self.readonly:
            raise UserError(f"{self.path} was opened read-only; open it for writing to change it")

    @property
    def version(self) -> int:
        """How many times the index file has been saved (0 before the first save)."""
        return int(self.sidecar.get_meta("version") or 0)

    def save(self) -> None:
        """Bring the FAISS index into agreement with the sidecar and write it atomically."""
        self._writable()
        if not self.dim:
            return
        target = vec.choose_factory(
            self.sidecar.get_meta("index_type") or "auto", len(self), self.flat_limit
        )
        if (
            self.index is None
            or not _same_kind(self.factory, target)
            or (vec.base_ivf(self.index) is not None and self._needs_tuning())
        ):
            self._rebuild(target if not _same_kind(self.factory, target) else None)
        else:
            self._sync(self.index)
        vec.write_atomic(self.index, self.path)
        self.sidecar.set_meta(
            {"index_ntotal": str(self.index.ntotal), "version": str(self.version + 1)}
        )
        if self._searcher is not None:
            self._searcher.refresh()

    # internals
    def set_index_type(self, index_type: str, expected: int) -> None:
        """Check that FAISS can build `index_type` for this model, then record it for save()."""
        self._writable()
        factory = vec.choose_factory(index_type, max(expected, 1), self.flat_limit)
        vec.new_index(factory, self.encoder.embedding_dim)  # a UserError before any work
        self.sidecar.set_meta({"index_type": index_type})

    def _check_model(self, fingerprint: str, dim: int) -> None:
        built_with = self.sidecar.get_meta("model_sha256")
        if built_with is not None and built_with != fingerprint:
            raise UserError(
                f"{self.path} was built with a different model (manifest sha256 "
                f"{built_with[:12]}…, this one {fingerprint[:12]}…); use a new --index"
            )
        if self.dim and dim != self.dim:
            raise UserError(f"{self.path} holds {self.dim}-d vectors; this model makes {dim}-d")

    def _ensure_meta(self, encoder: PackageEncoder) -> None:
        if self.sidecar.get_meta("model_sha256") is None:
            self.dim = encoder.embedding_dim
            self.sidecar.set_meta(
                {
                    "model_sha256": model_fingerprint(encoder.path),
                    "model_path": str(Path(encoder.path).resolve()),
                    "dim": str(self.dim),
                    "metric": "inner_product",
                    "normalized": "true",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )

    def _kind_ok(self, index: faiss.Index) -> bool:
        """Whether an index file is of the type the sidecar says it built."""
        return _factory_of(index) == _factory_of(vec.new_index(self.factory, self.dim))

    def _sync(self, index: faiss.IndexIDMap2) -> int:
        return vec.sync(index, self.sidecar.ids(), self.sidecar.vectors)

    def _needs_tuning(self) -> bool:
        tuned_at = int(self.sidecar.get_meta("tuned_ntotal") or 0)
        return abs(len(self) - tuned_at) > 0.1 * max(tuned_at, 1)

    def _rebuild(self, factory: str | None = None) -> None:
        """Build the index from every vector in the sidecar (and retune IVF)."""
        n = len(self)
        factory = factory or self.factory
        if n == 0:
            factory = "Flat"  # nothing to train on; the next save picks the type again
        ids = self.sidecar.ids()
        rng = np.random.default_rng(0)

        def sample(m: int) -> np.ndarray:
            picked = np.sort(rng.choice(ids, size=min(m, len(ids)), replace=False))
            return np.concatenate([v for _, v in self.sidecar.vectors(picked)])

        built = vec.build(factory, self.dim, self.sidecar.vectors, sample, n)
        self.index = built.index
        self.nprobe = built.nprobe
        meta = {"factory": built.factory, "tuned_ntotal": str(n), "nprobe": "", "recall_at_10": ""}
        if built.nprobe is not None:
            meta |= {"nprobe": str(built.nprobe), "recall_at_10": f"{built.recall_at_10:.4f}"}
        if not self.readonly:
            self.sidecar.set_meta(meta)


def _factory_of(index: faiss.Index) -> str:
    """A coarse description to notice an index file that is not the one the sidecar names."""
    ivf = vec.base_ivf(index)
    if ivf is not None:
        return f"IVF{ivf.nlist}"
    inner = faiss.downcast_index(index.index)
    kind = "Flat" if isinstance(inner, faiss.IndexFlat) else type(inner).__name__
    return f"{kind}/{inner.metric_type}"


def _same_kind(current: str, target: str) -> bool:
    """Whether an index built as `current` can be kept for `target` (IVF: nlist within 2x)."""
    if current == target:
        return True
    a, b = (re.fullmatch(r"IVF(\d+),Flat", f) for f in (current, target))
    return bool(a and b and 0.5 <= int(a[1]) / int(b[1]) <= 2.0)


def _item_fields(item) -> dict[str, Any]:
    return {
        "path": item.path,
        "label": item.label,
        "sha256": item.sha256,
        "width": item.width,
        "height": item.height,
    }


def open(
    path: str | Path,
    model: str | Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    create: bool = False,
    flat_limit: int = vec.FLAT_LIMIT,
    readonly: bool = False,
) -> ImageIndex:
    """Open an index (or start one: `create`); `model` defaults to the one it was built with.

    `readonly`: a reader (search, the service) that never writes a file; where the FAISS
    file lags the sidecar (a writer is between commits and its save) it patches the index
    in memory.
    """
    path = Path(path)
    db = sidecar_path(path)
    if not create and not db.is_file():
        if path.is_file():
            raise UserError(f"{db} is missing; an index needs its sidecar (rebuild with embed)")
        raise UserError(f"{path} is not an index (no {db.name}); make one with mocoserve embed")
    if create and not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist")
    if readonly and create:
        raise ValueError("an index is created for writing, not read-only")
    sidecar = Sidecar(db, readonly=readonly)
    stored_model = sidecar.get_meta("model_path")
    model_dir = Path(model) if model is not None else (Path(stored_model) if stored_model else None)
    if model is not None and sidecar.get_meta("model_sha256") is not None:
        if not Path(model).is_dir():
            raise UserError(f"{model} is not a model package folder")
        fingerprint = model_fingerprint(model) if (Path(model) / "manifest.json").is_file() else ""
        if fingerprint and fingerprint != sidecar.get_meta("model_sha256"):
            sidecar.close()
            raise UserError(
                f"{path} was built with a different model than {model}; "
                "embed into a new --index or use the model it was built with"
            )
    return ImageIndex(path, sidecar, model_dir, device, backend, flat_limit, readonly)
