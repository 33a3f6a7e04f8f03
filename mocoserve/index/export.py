"""An index's embeddings and metadata in the layout autofaiss and clip-retrieval read.

    DIR/img_emb/img_emb_0000.npy          float32 N x D, row i ...
    DIR/metadata/metadata_0000.parquet    ... is row i here: image_path, id, label, sha256, ...

or, with `fmt="parquet"`, `DIR/img_emb/img_emb_0000.parquet` holding an `embedding` column
beside the same metadata columns (autofaiss: `--file_format parquet`). Files hold at most
`rows_per_file` rows; the export streams block by block, so memory stays bounded.

`image_path` is text (what clip-retrieval reads), a name's bytes that are not UTF-8 as
the text \\xNN; `image_path_bytes` holds every name's exact bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir, path_text, public_mode
from mocoserve.index.catalog import CatalogMeta
from mocoserve.index.formats import open_store

ROWS_PER_FILE = 1_000_000
COLUMNS = ("image_path", "image_path_bytes", "id", "label", "sha256", "bytes", "width", "height")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(
            "writing parquet needs pyarrow: pip install pyarrow (or mocoserve[parquet])"
        ) from None
    return pyarrow


def export_index(
    index_path: str | Path, to: str | Path, fmt: str = "npy", rows_per_file: int = ROWS_PER_FILE
) -> dict[str, int]:
    """Write every item's embedding and metadata under `to` (a new folder); counts."""
    from mocoserve.index.writer import acquire_lock

    if fmt not in ("npy", "parquet"):
        raise UserError(f"--format must be npy or parquet, got {fmt!r}")
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UserError(f"{to} exists and is not empty; give a new folder")
    pa = _pyarrow()
    to.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(index_path)  # nothing changes while it is read
    try:
        store = open_store(index_path)  # a damaged index is refused before any file is made
    except BaseException:
        os.close(lock)
        raise
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    os.chmod(staging, public_mode(directory=True))
    try:
        total, dim = len(store), CatalogMeta.of(store).dim
        (staging / "img_emb").mkdir()
        if fmt == "npy":
            (staging / "metadata").mkdir()
        files = _write(store, staging, fmt, total, dim, rows_per_file, pa)
        if to.exists():
            to.rmdir()
        os.replace(staging, to)
        fsync_dir(to.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        store.close()
        os.close(lock)
    return {"items": total, "dim": dim, "files": files}


def _write(store, out: Path, fmt: str, total: int, dim: int, per_file: int, pa) -> int:
    import pyarrow.parquet as pq

    part, written, emb, meta_writer = -1, 0, None, None

    def open_part(k: int) -> tuple[Any, Any]:
        rows = min(per_file, total - k * per_file)
        if fmt == "npy":
            array = np.lib.format.open_memmap(
                out / "img_emb" / f"img_emb_{k:04d}.npy", "w+", np.float32, (rows, dim)
            )
            return array, None
        return None, None

    for ids, vectors in store.vectors():
        items = store.items(ids)
        start = 0
        while start < len(ids):
            k = written // per_file
            if k != part:
                _close(emb, meta_writer)
                part, emb, meta_writer = k, *open_part(k)
            room = (k + 1) * per_file - written
            take = slice(start, start + min(room, len(ids) - start))
            block_ids, block = ids[take], vectors[take]
            rows = [items[int(i)] for i in block_ids]
            table = pa.table(
                {
                    "image_path": [path_text(r.path) for r in rows],
                    "image_path_bytes": pa.array([os.fsencode(r.path) for r in rows], pa.binary()),
                    "id": pa.array([r.id for r in rows], pa.int64()),
                    "label": [r.label for r in rows],
                    "sha256": [r.sha256 for r in rows],
                    "bytes": pa.array([r.bytes for r in rows], pa.int64()),
                    "width": pa.array([r.width for r in rows], pa.int32()),
                    "height": pa.array([r.height for r in rows], pa.int32()),
                }
            )
            if fmt == "npy":
                offset = written - k * per_file
                emb[offset : offset + len(block)] = block
                name = out / "metadata" / f"metadata_{k:04d}.parquet"
            else:
                flat = pa.array(np.ascontiguousarray(block, np.float32).reshape(-1))
                table = table.append_column(
                    "embedding", pa.FixedSizeListArray.from_arrays(flat, dim)
                )
                name = out / "img_emb" / f"img_emb_{k:04d}.parquet"
            if meta_writer is None:
                meta_writer = pq.ParquetWriter(name, table.schema)
            meta_writer.write_table(table)
            written += len(block)
            start = take.stop
    _close(emb, meta_writer)
    return part + 1


def _close(emb: Any, meta_writer: Any) -> None:
    if emb is not None:
        emb.flush()
        del emb
    if meta_writer is not None:
        meta_writer.close()
