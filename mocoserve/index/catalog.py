"""The catalog of an index (`out.faiss.db`): its `meta` table typed (`CatalogMeta`), and the
SQLite file (`Catalog`).

The table holds strings; `CatalogMeta.from_meta` is the one place they are parsed (a value
that does not parse is a `DamagedIndex` naming its key) and `CatalogMeta.to_meta` the one
place they are written. The same keys serve format 1 (`mocoserve.index.formats`), which
lacks the format-2 ones (defaults then).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mocoserve.ann.params import SearchSettings
from mocoserve.ann.planner import IndexChoice, show_size
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.dbfile import DbFile
from mocoserve.index.files import DamagedIndex, IndexFiles

FORMAT_VERSION = 2  # the catalog's format (1: the sidecar of `mocoserve.index.formats`)


class HasMeta(Protocol):
    """Whatever reads a catalog's meta table: the Catalog, a store, the format-1 sidecar."""

    def meta(self) -> dict[str, str]: ...


FP16_RECALL_COST = 0.001  # recall@10 lost by rounding unit vectors to float16 (measured:
# a float16 store keeps 0.9997 of float32's neighbours, docs/benchmarks.md)


def _text(value: str) -> str:
    return value


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(value)
    return value == "true"


def _ids(value: str) -> frozenset[int]:
    return frozenset(int(s) for s in value.split(",") if s)


def _show(value: Any, key: str = "") -> str:
    """A field as the table keeps it ("" for None: a value cleared)."""
    if value is None:
        return ""
    if key in _FORMATS:
        return _FORMATS[key].format(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset):
        return ",".join(map(str, sorted(value)))
    return repr(value) if isinstance(value, float) else str(value)


# key -> (parser, what it must be); "" reads as the field's default, like a missing key
_KINDS: dict[type | str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "bool": (_bool, "true or false"),
    "str": (_text, "text"),
    "ids": (_ids, "a list of shard numbers"),
}


@dataclass(frozen=True)
class CatalogMeta:
    """Every fact the catalog keeps, typed; each field is one meta key (choice and settings
    are several: see `_CHOICE` and `_SETTINGS`)."""

    # made with the index (`IndexWriter.prepare`)
    format_version: int | None = None  # None: format 1 from before versions were recorded
    model_sha256: str | None = None  # the package's manifest sha256 (`model_fingerprint`)
    model_path: str | None = None
    dim: int = 0  # 0: nothing says yet (a format-1 index that embedded nothing)
    metric: str | None = None  # inner_product
    normalized: bool | None = None
    shards: int = 1
    store_dtype: str = "float32"
    created: str | None = None
    labels: str | None = None  # folders | none | None (an index from before it was kept)
    shards_made: frozenset[int] | None = None  # None: from before the catalog listed them
    # what the index is to be built as (--index-type, --max-index-memory, ...)
    choice: IndexChoice = field(default_factory=lambda: IndexChoice("auto", None, None, False))
    # the last build (`IndexWriter.build`)
    factory: str = "Flat"
    settings: SearchSettings = field(default_factory=SearchSettings)
    tuned_ntotal: int = 0  # vectors the index was trained and tuned at
    tuned_target: float | None = None  # the recall target it was tuned for
    recall_at_10: float | None = None
    qps: float | None = None
    plan_why: str | None = None
    on_disk_built: bool = False
    ram_bytes: int | None = None
    disk_bytes: int | None = None
    gpu_fp16: bool = False
    index_ntotal: int = 0
    version: int = 0  # builds saved (0: never)
    built_at: float = 0.0  # time.time() of the last build

    @classmethod
    def from_meta(
        cls, meta: dict[str, str], where: str | Path = "the index catalog"
    ) -> CatalogMeta:
        """Parse the meta table; a value of the wrong kind is a DamagedIndex naming its key."""

        def get(key: str, kind: str, default: Any = None) -> Any:
            value = meta.get(key)
            if value is None or value == "":
                return default
            parse, what = _KINDS[kind]
            try:
                return parse(value)
            except ValueError:
                raise DamagedIndex(
                    f"{where} is damaged: its meta value {key} is {value!r}, not {what}"
                ) from None

        values = {f.name: get(f.name, kind) for f in _FIELDS for kind in [_KIND_OF[f.name]]}
        values = {k: v for k, v in values.items() if v is not None}
        choice = IndexChoice(
            get("index_type", "str", "auto"),
            get("max_index_memory", "int"),
            get("recall_target", "float"),
            get("on_disk", "bool", False),
        )
        settings = SearchSettings(
            get("nprobe", "int"), get("ef_search", "int"), get("k_factor", "int") or 1
        )
        return cls(**values, choice=choice, settings=settings)

    @classmethod
    def of(cls, source: HasMeta) -> CatalogMeta:
        """The meta of a catalog, a store or a format-1 sidecar."""
        path = getattr(source, "path", None) or getattr(source, "index_path", None)
        where = f"{path}.db" if path is not None and not str(path).endswith(".db") else path
        return cls.from_meta(source.meta(), where or "the index catalog")

    def to_meta(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """The table's entries (these keys only, when given: `MADE`, `CHOICE`, `BUILT`).

        None is written "" (cleared) for the build's facts; the facts an index is made with
        are left out while None (a missing key means something: a new index, format 1).
        """
        entries = {}
        for f in _FIELDS:
            value = getattr(self, f.name)
            if value is not None or f.name in _CLEARABLE:
                entries[f.name] = _show(value, f.name)
        entries.update(self.choice.to_meta())
        entries.update(self.settings.to_meta())
        return entries if keys is None else {k: entries[k] for k in keys if k in entries}

    def replace(self, **changes: Any) -> CatalogMeta:
        return dataclasses.replace(self, **changes)

    # facts derived from the catalog
    @property
    def labelled_by_folders(self) -> bool:
        return self.labels == "folders"

    def check_model(self, index: str | Path, sha256: str, dim: int | None = None) -> None:
        """Refuse a model other than the one the index was built with (by fingerprint), or
        one that makes vectors of another size."""
        if self.model_sha256 is not None and self.model_sha256 != sha256:
            raise UserError(
                f"{index} was built with a different model (manifest sha256 "
                f"{self.model_sha256[:12]}…, this one {sha256[:12]}…); "
                "embed into a new --index or use the model it was built with"
            )
        if dim is not None and self.dim and dim != self.dim:
            raise UserError(f"{index} holds {self.dim}-d vectors; this model makes {dim}-d")

    def made_with(
        self, facts: ModelFacts, shards: int | None, store_dtype: str | None
    ) -> CatalogMeta:
        """A new index's catalog: the model's facts, its fixed layout (write `MADE`)."""
        return self.replace(
            format_version=FORMAT_VERSION,
            model_sha256=facts.sha256,
            model_path=facts.path,
            dim=facts.dim,
            metric="inner_product",
            normalized=True,
            shards=shards or 1,
            store_dtype=store_dtype or "float32",
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def fp16_keeps_target(self, target: float) -> bool:
        """Whether GPU copies may store float16 (half the GPU memory) for an exact-code index:
        the store is float16 already, or the tuned recall has room for fp16's rounding."""
        if self.store_dtype == "float16":
            return True
        return self.recall_at_10 is None or self.recall_at_10 >= target + FP16_RECALL_COST

    def build_facts(self) -> dict[str, Any]:
        """What the last build chose and measured (for `info` and reports)."""
        return {
            "on_disk": self.on_disk_built,
            "plan": self.plan_why,
            "ef_search": self.settings.ef_search,
            "k_factor": self.settings.k_factor,
            "recall_at_10": self.recall_at_10,
            "recall_target": self.tuned_target,
            "qps": self.qps,
            "ram_bytes": self.ram_bytes,
            "disk_bytes": self.disk_bytes,
            "max_index_memory": self.choice.max_index_memory,
        }

    def describe_build(self) -> str:
        """One line: the index type, its bytes, and recall/QPS as tuned."""
        parts = [self.factory]
        if self.ram_bytes is not None:
            parts.append(f"{show_size(self.ram_bytes)} in RAM")
        if self.on_disk_built and self.disk_bytes is not None:
            parts.append(f"{show_size(self.disk_bytes)} of lists on disk")
        settings = self.settings.describe()
        if self.recall_at_10 is not None:
            tuned = f"recall@10 {self.recall_at_10:.3f}"
            parts.append(f"{tuned} at {settings}" if settings else tuned)
        if self.qps:
            parts.append(f"{self.qps:,.0f} queries/s on the CPU")
        return ", ".join(parts)


_FIELDS = [f for f in dataclasses.fields(CatalogMeta) if f.name not in ("choice", "settings")]
_KIND_OF = {
    f.name: {"int | None": "int", "int": "int", "float | None": "float", "float": "float"}.get(
        str(f.type),
        "bool" if "bool" in str(f.type) else "ids" if "frozenset" in str(f.type) else "str",
    )
    for f in _FIELDS
}
# the keys each writer of the catalog writes (`IndexWriter.prepare`, `.choose`, `.build`)
MADE = (
    "format_version", "model_sha256", "model_path", "dim", "metric", "normalized", "shards",
    "store_dtype", "created",
)  # fmt: skip
CHOICE = ("index_type", "max_index_memory", "recall_target", "on_disk")
BUILT = (
    "factory", "nprobe", "ef_search", "k_factor", "tuned_ntotal", "tuned_target",
    "recall_at_10", "qps", "plan_why", "on_disk_built", "ram_bytes", "disk_bytes", "gpu_fp16",
    "index_ntotal", "version", "built_at",
)  # fmt: skip
_FORMATS = {"recall_at_10": "{:.4f}", "qps": "{:.0f}"}  # as measured: no false precision
_CLEARABLE = {"recall_at_10", "qps", "tuned_target", "plan_why"}


# --- the catalog's SQLite file ---


def catalog_damage(index_path: str | Path) -> str | None:
    """Why the catalog beside an index cannot be used, when it is there; None if it can."""
    db = IndexFiles(index_path).catalog
    if not db.is_file():
        return None
    if db.stat().st_size == 0:
        return f"{db} is damaged: it is empty (0 bytes)"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            meta = dict(conn.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return f"{db} is damaged: not a readable SQLite file ({e})"
    if "meta" not in tables:
        return f"{db} is damaged: it has no meta table"
    if "format_version" not in meta and "items" not in tables:  # neither format 2 nor 1
        return f"{db} is damaged: its meta table has no format_version"
    if meta.get("format_version") == str(FORMAT_VERSION):
        lost = [key for key in ("dim", "shards") if not meta.get(key)]
        if lost:
            return f"{db} is damaged: its meta table has no {' or '.join(lost)}"
    return None


class Catalog(DbFile):
    """`out.faiss.db` of a format-2 index: index-level facts only (the `meta` table)."""

    what = "index catalog"

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        super().__init__(path, "", readonly, journal="DELETE")

    def listed_shards(self) -> set[int] | None:
        """The shards writers have made (None: an index from before the catalog listed them)."""
        value = self.get_meta("shards_made")
        return None if value is None else {int(s) for s in value.split(",") if s}

    def list_shards(self, shards: Iterable[int]) -> None:
        """Add shards that now exist to the list (the catalog's writer, under the index lock)."""
        listed = self.listed_shards()
        new = (listed or set()) | set(shards)
        if listed is None or new != listed:
            self.set_meta({"shards_made": ",".join(map(str, sorted(new)))})
