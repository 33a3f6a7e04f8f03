"""`embed_folders`: image folders -> an index, resumable and incremental.

A run scans the folders, compares every file's size and mtime with the sidecar, removes
what was deleted, embeds what is new or changed (and what failed before), and saves the
index. Killed at any point, the next run picks up after the last committed batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mocoserve import index as index_mod
from mocoserve.core.errors import UserError
from mocoserve.core.images import iter_image_files
from mocoserve.decode import default_workers
from mocoserve.model import load
from mocoserve.vectors import FLAT_LIMIT


@dataclass
class EmbedSummary:
    """What an embed run did and what the index holds now."""

    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    relabelled: int = 0
    total: int = 0
    labelled: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    factory: str = ""
    nprobe: int | None = None
    recall_at_10: float | None = None
    provider: str = ""
    repaired: bool = False

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.failed) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class FoundFile:
    path: str
    label: str | None
    bytes: int
    mtime: int


def scan(roots: Sequence[str | Path], labels_from_folders: bool) -> list[FoundFile]:
    """Image files under the roots (a root may also be one file), each once, in order."""
    found: dict[str, FoundFile] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise UserError(f"{root} does not exist")
        files = [root] if root.is_file() else iter_image_files(root)
        for file in files:
            path = os.path.abspath(file)
            if path in found:
                continue
            label = None
            if labels_from_folders and root.is_dir():
                parts = Path(file).relative_to(root).parts
                label = parts[0] if len(parts) > 1 else None  # ImageFolder: top-level folder
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished between listing and stat
            found[path] = FoundFile(path, label, st.st_size, st.st_mtime_ns)
    return list(found.values())


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def embed_folders(
    roots: Sequence[str | Path],
    model: str | Path,
    index_path: str | Path,
    batch_size: int = 64,
    workers: int | None = None,
    index_type: str | None = None,
    labels_from_folders: bool | None = None,
    device: str = "auto",
    backend: str = "auto",
    flat_limit: int = FLAT_LIMIT,
    on_start: Callable[[int, str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed every image under `roots` into the index at `index_path` (created if new).

    `index_type` None keeps the type the index was made with (auto for a new one).
    `labels_from_folders` None keeps how the index was labelled (its sidecar remembers):
    True labels every item by its top-level folder, False drops the labels.

    `on_start(todo, provider)` and `on_progress(n)` drive a progress bar.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not roots:
        raise UserError("give at least one image folder")
    started = time.perf_counter()
    index_path = Path(index_path)
    if not index_path.parent.is_dir():
        raise UserError(f"folder {index_path.parent} does not exist (for --index {index_path})")
    if index_path.exists() and not index_mod.sidecar_path(index_path).is_file():
        raise UserError(
            f"{index_path} exists and is not an index made by embed (no "
            f"{index_mod.sidecar_path(index_path).name}); choose another --index"
        )
    if labels_from_folders is None:
        labels_from_folders = index_mod.labelled_by_folders(index_path)
    files = scan(roots, labels_from_folders)
    abs_roots = [os.path.abspath(r) for r in roots]
    # the package is verified (sha256s, its manifest against the model) before any file of
    # the index is written: a bad package leaves nothing behind
    loaded = load(model, backend, device) if model is not None else None
    with index_mod.writer_lock(index_path):
        idx = index_mod.open(index_path, model, device, backend, create=True, flat_limit=flat_limit)
        try:
            if loaded is not None:
                idx.attach(loaded)
            encoder = idx.encoder
            if index_type is not None:
                idx.set_index_type(index_type, len(files))
            idx.sidecar.set_meta({"labels": "folders" if labels_from_folders else "none"})
            summary = EmbedSummary(provider=encoder.provider, repaired=idx.repaired)
            known = idx.sidecar.stats()
            present = {f.path for f in files}
            gone = [p for p in known if p not in present and _under(p, abs_roots)]
            gone_failures = [
                p for p, _ in idx.sidecar.failures() if p not in present and _under(p, abs_roots)
            ]
            summary.removed = idx.sidecar.remove_paths(gone + gone_failures)
            todo, relabel = [], []
            for f in files:
                row = known.get(f.path)
                if row is not None and (row[1], row[2]) == (f.bytes, f.mtime):
                    summary.skipped += 1
                    if row[3] != f.label:
                        relabel.append((f.label, f.path))
                else:
                    todo.append(f)
            if relabel:
                idx.sidecar.set_labels(relabel)
                summary.relabelled = len(relabel)
            if on_start is not None:
                on_start(len(todo), encoder.provider)
            counts = idx.ingest(
                [f.path for f in todo],
                [f.label for f in todo],
                batch_size,
                default_workers() if workers is None else workers,
                on_progress,
            )
            summary.embedded, summary.failed = counts.embedded, counts.failed
            idx.save()
            meta = idx.sidecar.meta()
            summary.total = len(idx)
            summary.labelled = idx.sidecar.labelled()
            summary.failures = idx.sidecar.failures()
            summary.factory = meta.get("factory", "Flat")
            summary.nprobe = int(meta["nprobe"]) if meta.get("nprobe") else None
            if meta.get("recall_at_10") and summary.nprobe:
                summary.recall_at_10 = float(meta["recall_at_10"])
        finally:
            idx.sidecar.close()
    summary.seconds = time.perf_counter() - started
    return summary
