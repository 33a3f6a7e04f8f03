"""An image index, read: a FAISS file (`out.faiss`) and its store, searched by image, vector or id.

    import mocoserve.index.reader
    index = mocoserve.index.reader.open("out.faiss")
    hits = index.search_images(["query.jpg"], k=10)[0]

The store is format 2 (`mocoserve.index.store`: a catalog and shards of metadata and vectors) or
format 1 (`mocoserve.index.formats`: everything in one SQLite file, from before sharding). The
FAISS file is derived from the store; opening checks that the two agree and patches the
in-memory index where a writer is between its commits and its next build. A reader never
writes a file: changes go through `mocoserve.index.writer.IndexWriter` (`remove` here opens
one; files are added by `mocoserve.ingest.runner.add_files`, which embeds them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mocoserve.ann.factory import normalize
from mocoserve.ann.search import Searcher
from mocoserve.ann.tune import RECALL_TARGET
from mocoserve.core.decode import decode_file
from mocoserve.core.errors import UserError
from mocoserve.core.images import resize_crop
from mocoserve.core.manifest import ModelFacts, model_fingerprint
from mocoserve.index.catalog import CatalogMeta
from mocoserve.index.faissfile import build_faiss, load_faiss
from mocoserve.index.files import IndexFiles
from mocoserve.index.formats import Sidecar, open_store
from mocoserve.index.items import Item
from mocoserve.index.store import ShardedStore
from mocoserve.model import PackageEncoder, load, to_input

__all__ = [
    "Hit",
    "ImageIndex",
    "Item",
    "labelled_by_folders",
    "open",
]

Store = ShardedStore | Sidecar


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


def labelled_by_folders(index_path: str | Path) -> bool:
    """Whether an existing index was labelled from folder names (False for a new one)."""
    if not IndexFiles(index_path).catalog.is_file():
        return False
    store = open_store(index_path)
    try:
        mode = CatalogMeta.of(store).labels
        return mode == "folders" or (mode is None and bool(store.labels()))
    finally:
        store.close()


class ImageIndex:
    """Search an index; see the module docstring."""

    def __init__(
        self,
        path: Path,
        store: Store,
        model_dir: Path | None,
        device: str,
        backend: str,
        readonly: bool = True,
    ) -> None:
        self.path = path
        self.readonly = readonly  # True: remove refused (a service, a search)
        self.store = store
        self.model_dir = model_dir
        self.device = device
        self.backend = backend
        self._encoder: PackageEncoder | None = None
        self._searcher: Searcher | None = None
        self._load()

    def _load(self) -> None:
        store = self.store
        # the catalog as loaded (a writer updates it in place): the version an answer
        # names, and every fact, are those of the index that answers
        self.meta = CatalogMeta.of(store)
        if isinstance(store, ShardedStore):
            store.hold()  # its files and rows, before the FAISS file (which they patch)
        self.dim = self.meta.dim
        self._len = len(store)
        self.settings = self.meta.settings
        loaded = load_faiss(store, self.path, self.factory, self.dim)
        self.index, self.repaired = loaded.index, loaded.repaired
        if self.index is None and self.dim:
            if self.meta.on_disk_built:
                raise UserError(
                    f"{self.path} keeps its lists on disk and its file is missing or damaged; "
                    "run mocoserve index build"
                )
            target = self.meta.tuned_target or RECALL_TARGET
            built = build_faiss(store, self.factory, target)  # in memory: never written
            self.index, self.settings = built.index, built.settings
        self._hidden, self._extra = loaded.hidden, loaded.extra
        self._searcher = None

    def close(self) -> None:
        self.store.close()

    # facts
    def __len__(self) -> int:
        return self._len

    @property
    def factory(self) -> str:
        return self.meta.factory

    @property
    def version(self) -> int:
        """How many times the index file had been saved when this was loaded (0: never)."""
        return self.meta.version

    @property
    def format(self) -> int:
        return 2 if isinstance(self.store, ShardedStore) else 1

    @property
    def nprobe(self) -> int | None:
        return self.settings.nprobe

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            if self.index is None:
                raise UserError(f"{self.path} is empty: nothing has been embedded yet")
            self._searcher = Searcher(
                self.index,
                self.settings,
                self.device,
                gather=self.store.gather,
                hidden=self._hidden,
                extra=self._extra,
                gpu_fp16=self.meta.gpu_fp16,
            )
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
            self.meta.check_model(
                self.path, model_fingerprint(self.model_dir), encoder.embedding_dim
            )
            self._encoder = encoder
        return self._encoder

    def attach(self, encoder: PackageEncoder) -> None:
        """Use an already loaded (and verified) package; it must be the index's model."""
        self.meta.check_model(self.path, model_fingerprint(encoder.path), encoder.embedding_dim)
        self._encoder = encoder

    def ids(self) -> np.ndarray:
        return self.store.ids()

    def labels(self) -> list[str]:
        return self.store.labels()

    def info(self) -> dict[str, Any]:
        """Facts for headers and reports (of the index as loaded)."""
        meta = self.meta
        return {
            "index": str(self.path),
            "items": len(self),
            "dim": self.dim,
            "factory": self.factory,
            "nprobe": self.nprobe,
            "model": meta.model_path,
            "model_sha256": meta.model_sha256,
            "labels": self.store.labels(),
            "search_device": self.searcher.device if self.index is not None else "cpu",
            "format": self.format,
            "shards": meta.shards,
            **meta.build_facts(),
            "gpus": self.searcher.gpus if self.index is not None else 0,
            "gpu_layout": self.searcher.layout if self.index is not None else None,
        }

    # search
    def search_vectors(
        self, queries: np.ndarray, k: int = 10, label: str | None = None
    ) -> list[list[Hit]]:
        """Nearest items to each query vector (normalised here), best first."""
        queries = normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise UserError(f"queries are {queries.shape[1]}-d, the index is {self.dim}-d")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if len(self) == 0 or self.index is None:
            return [[] for _ in queries]
        allowed = None if label is None else self.store.ids_with_label(label)
        hits: list[list[Hit]] = [[] for _ in queries]
        rows = np.arange(len(queries))
        while len(rows):
            scores, ids = self.searcher.search(queries[rows], k, allowed)
            items = self.store.items(np.unique(ids[ids >= 0]))
            for row, row_s, row_i in zip(rows, scores, ids, strict=True):
                hits[row] = [
                    Hit(int(i), float(s), **_item_fields(items[int(i)]))
                    for s, i in zip(row_s, row_i, strict=True)
                    if i >= 0 and int(i) in items
                ]
            gone = np.setdiff1d(ids[ids >= 0], np.fromiter(items, np.int64, len(items)))
            if not len(gone):
                break
            # removed since this index was loaded (a writer between its commits and its
            # build): searched past from now on, and the queries they left short again
            self.searcher.hide(gone)
            rows = np.asarray([r for r in rows if len(hits[r]) < k], dtype=np.int64)
        return hits

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
                pixels = resize_crop(
                    image, encoder.resize, encoder.input_size, encoder.interpolation
                )
                batch.append(np.asarray(pixels))
                hashes.append(None)
                continue
            decoded = decode_file(
                str(image),
                encoder.resize,
                encoder.input_size,
                interpolation=encoder.interpolation,
            )
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
        return self.store.items(ids)

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of these ids, in the order given; an unknown id is a UserError."""
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors, found = self.store.gather(wanted)
        found &= np.isin(wanted, list(self.store.items(wanted)))  # not removed since loaded
        if not found.all():
            raise UserError(f"no item with id {int(wanted[~found][0])} in {self.path}")
        return vectors

    def search_ids(
        self, ids: Sequence[int], k: int = 10, label: str | None = None
    ) -> list[list[Hit]]:
        """Nearest items to indexed items (by their stored vectors); each item's own hit flagged."""
        results = self.search_vectors(self.vectors_of(ids), k, label)
        return [
            [Hit(**{**h.to_dict(), "is_query": h.id == int(own)}) for h in hits]
            for own, hits in zip(ids, results, strict=True)
        ]

    # changes, through the index's writer
    def _writable(self) -> None:
        if self.readonly:
            raise UserError(f"{self.path} was opened read-only; open it for writing to change it")

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Remove these files from the index and save it; how many were there."""
        from mocoserve.index.writer import IndexWriter

        self._writable()
        with IndexWriter(self.path) as writer:
            writer.prepare(ModelFacts.of_package(self.encoder.path))
            writer.own(range(writer.shard_count))
            removed = writer.remove_paths(os.path.abspath(p) for p in paths)
            writer.build()
        self._reopen()
        return removed

    def _reopen(self) -> None:
        self.store.close()
        self.store = open_store(self.path)
        self._load()


def _item_fields(item: Item) -> dict[str, Any]:
    return {
        "path": item.path,
        "label": item.label,
        "sha256": item.sha256,
        "width": item.width,
        "height": item.height,
    }


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode): a file put in place of another (a new index) has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def open(
    path: str | Path,
    model: str | Path | None = None,
    device: str = "auto",
    backend: str = "auto",
    readonly: bool = False,
) -> ImageIndex:
    """Open an index to search; `model` defaults to the one it was built with.

    `readonly` refuses `remove` (a service, a search). Opening never writes a file:
    where the FAISS file lags the store (a writer is between its commits and its next
    build), the index is patched in memory.
    """
    path = Path(path)
    db = IndexFiles(path).catalog
    if not db.is_file():
        if path.is_file():
            raise UserError(f"{db} is missing; an index needs its catalog (rebuild with embed)")
        raise UserError(f"{path} is not an index (no {db.name}); make one with mocoserve embed")
    catalog = _file_id(db)
    store = open_store(path)
    try:
        meta = CatalogMeta.of(store)
        stored_model = meta.model_path
        model_dir = (
            Path(model) if model is not None else (Path(stored_model) if stored_model else None)
        )
        if model is not None and meta.model_sha256 is not None:
            if not Path(model).is_dir():
                raise UserError(f"{model} is not a model package folder")
            if (Path(model) / "manifest.json").is_file():  # else: loading it says what is wrong
                meta.check_model(path, model_fingerprint(model))
        index = ImageIndex(path, store, model_dir, device, backend, readonly)
        if _file_id(db) != catalog:  # the FAISS file read may be the new index's
            raise UserError(f"{path} was replaced while it was opened; open it again")
        return index
    except BaseException:
        store.close()
        raise
