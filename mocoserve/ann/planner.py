"""Which FAISS index for n vectors of d dimensions in a memory budget: written-down heuristics.

After autofaiss's `get_optimal_*` functions: pure functions of (n, d, budget), so the choice
is explained and testable. In order of preference, the first that fits the budget:

1. Flat            exact search; n * d * 4 bytes (up to FLAT_LIMIT vectors: beyond, exact
                   search is too slow to serve whatever the memory)
2. IVF-Flat        nlist = 4 * sqrt(n) lists of the full vectors; n * (4d + 8) bytes
3. IVF-SQ8         the same lists, every dimension as one byte; n * (d + 8) bytes
4. OPQ + IVF-PQ    every vector as M bytes (M sub-quantizers of 256 centroids after an OPQ
                   rotation), its id 8 bytes; the largest M that fits (more bytes, better
                   recall), M dividing d with at least 4 dimensions each and a code size
                   FAISS's GPU IVF-PQ takes

Compressed codes (3, 4) rank candidates approximately: the search can re-rank k * k_factor
of them with the stored float vectors (the refine step), and tuning chooses k_factor where
the recall target needs it (`mocoserve.tuning`).

The coarse quantizer is an HNSW graph when nlist is large (65,536 and up), where a flat
quantizer's nlist x d comparisons per query would dominate. With `on_disk` the inverted
lists live in a file: only the coarse quantizer counts against the RAM budget, and IVF-Flat
lists (the best recall) are chosen whenever that quantizer fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mocoserve.core.errors import UserError

FLAT_LIMIT = 1_000_000  # auto without a budget: exact search up to this many vectors
HNSW_QUANTIZER_NLIST = 65_536  # from here on, the coarse quantizer is an HNSW graph
ID_BYTES = 8
GPU_PQ_SIZES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # GpuIndexIVFPQ
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
MAX_BUDGET = 2**50  # 1 PiB: far above any real budget, far below int64 and inf


def parse_size(text: str) -> int:
    """'256M', '4G', '1.5GiB', '300MB' or a number of bytes -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"--max-index-memory takes a size like 256M or 4G, got {text!r}")
    size = float(match[1]) * _UNITS[match[2].upper()]
    if not size <= MAX_BUDGET:  # 400 digits are a float inf, which int() cannot take
        raise UserError(f"--max-index-memory must be at most 1024T, got {text!r}")
    size = int(size)
    if size < 1 << 20:
        raise UserError(f"--max-index-memory must be at least 1M, got {text!r}")
    return size


def show_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ivf_nlist(n: int) -> int:
    """The IVF list count for n vectors: about 4 * sqrt(n), at most n / 39 (k-means needs 39+)."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39 or 1))


@dataclass(frozen=True)
class Plan:
    """A chosen index: its factory string, what it should cost, and why it was chosen."""

    factory: str
    ram_bytes: int
    disk_bytes: int
    why: str


def coarse(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_NLIST else f"IVF{nlist}"


def quantizer_bytes(nlist: int, d: int) -> int:
    hnsw = 32 * 2 * 4 if nlist >= HNSW_QUANTIZER_NLIST else 0  # graph links per centroid
    return nlist * (d * 4 + hnsw)


def pq_sizes(d: int) -> list[int]:
    """Code sizes M (bytes) for d dims: M | d, at least 4 dims per sub-quantizer, GPU-able."""
    return [m for m in GPU_PQ_SIZES if d % m == 0 and d // m >= 4] or [1]


def plan_index(
    n: int, d: int, budget: int | None = None, on_disk: bool = False, flat_limit: int = FLAT_LIMIT
) -> Plan:
    """The index `--index-type auto` builds for n vectors of d dims within `budget` bytes."""
    n = max(n, 1)
    flat = n * d * 4
    if budget is None:
        if n <= flat_limit:
            return Plan("Flat", flat, flat, f"exact search up to {flat_limit:,} vectors")
        nlist = ivf_nlist(n)
        return Plan(f"{coarse(nlist)},Flat", flat + n * ID_BYTES, 0, "IVF-Flat above that")
    if flat <= budget and n <= flat_limit and not on_disk:
        return Plan("Flat", flat, flat, f"exact search fits: {show_size(flat)}")
    nlist = ivf_nlist(n)
    centroids = quantizer_bytes(nlist, d)
    ivf_flat = n * (d * 4 + ID_BYTES)
    if on_disk:
        if centroids > budget:
            raise UserError(
                f"even on disk, {n:,} vectors need {show_size(centroids)} of coarse centroids "
                f"in RAM; --max-index-memory {show_size(budget)} is too small"
            )
        return Plan(
            f"{coarse(nlist)},Flat",
            centroids,
            ivf_flat,
            f"IVF-Flat, lists on disk ({show_size(ivf_flat)}); centroids in RAM",
        )
    if ivf_flat + centroids <= budget:
        return Plan(f"{coarse(nlist)},Flat", ivf_flat + centroids, 0, "IVF-Flat fits")
    sq8 = n * (d + ID_BYTES) + centroids
    if sq8 <= budget:
        return Plan(
            f"{coarse(nlist)},SQ8", sq8, 0, f"1 byte a dimension; Flat would need {show_size(flat)}"
        )
    opq = d * d * 4
    room = (budget - centroids - opq) / n - ID_BYTES  # bytes left for each vector's code
    sizes = [m for m in pq_sizes(d) if m <= room]
    if not sizes:
        smallest = n * (min(pq_sizes(d) or [1]) + ID_BYTES) + centroids + opq
        raise UserError(
            f"{n:,} {d}-d vectors need at least {show_size(smallest)} compressed; "
            f"--max-index-memory {show_size(budget)} is too small"
        )
    m = max(sizes)
    ram = n * (m + ID_BYTES) + centroids + opq
    return Plan(
        f"OPQ{m},{coarse(nlist)},PQ{m}",
        ram,
        0,
        f"{m} bytes a vector (OPQ + IVF-PQ); Flat would need {show_size(flat)}",
    )


def choose(
    index_type: str,
    n: int,
    d: int,
    budget: int | None = None,
    on_disk: bool = False,
    flat_limit: int = FLAT_LIMIT,
) -> Plan:
    """The plan for `--index-type` (auto, flat, ivf, hnsw or a FAISS factory string).

    auto follows `plan_index`; the named types are taken as asked (their bytes estimated
    where the formula is known, else 0) and `--on-disk` needs one with inverted lists.
    """
    kind = index_type.strip()
    if kind == "auto":
        return plan_index(n, d, budget, on_disk, flat_limit)
    n = max(n, 1)
    if kind == "flat":
        factory = "Flat"
    elif kind == "ivf":
        factory = f"{coarse(ivf_nlist(n))},Flat"
    elif kind == "hnsw":
        factory = "HNSW32,Flat"
    else:
        factory = kind
        for prefix in ("IDMap2,", "IDMap,"):
            factory = factory.removeprefix(prefix)
    if on_disk and not re.search(r"(^|,)(OPQ\d+(_\d+)?,)?IVF\d+", factory):
        raise UserError(
            f"--on-disk keeps inverted lists on disk: it needs an IVF index (auto or ivf), "
            f"not {factory!r}"
        )
    estimate = {"Flat": n * d * 4, "HNSW32,Flat": n * (d * 4 + 32 * 2 * 4 + ID_BYTES)}
    ram = estimate.get(factory, 0)
    return Plan(factory, ram, 0, f"--index-type {index_type}")


@dataclass(frozen=True)
class IndexChoice:
    """What the user asked of the index; each field None keeps what the index remembers."""

    index_type: str | None = None
    max_index_memory: int | None = None  # bytes
    recall_target: float | None = None
    on_disk: bool | None = None

    def __post_init__(self) -> None:
        if self.recall_target is not None and not 0 < self.recall_target <= 1:
            raise UserError(f"--recall-target must be in (0, 1], got {self.recall_target}")

    def to_meta(self) -> dict[str, str]:
        """The catalog entries to remember (only what was given)."""
        meta = {}
        if self.index_type is not None:
            meta["index_type"] = self.index_type
        if self.max_index_memory is not None:
            meta["max_index_memory"] = str(self.max_index_memory)
        if self.recall_target is not None:
            meta["recall_target"] = repr(self.recall_target)
        if self.on_disk is not None:
            meta["on_disk"] = "true" if self.on_disk else "false"
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> IndexChoice:
        budget, target = meta.get("max_index_memory"), meta.get("recall_target")
        return cls(
            meta.get("index_type") or "auto",
            int(budget) if budget else None,
            float(target) if target else None,
            meta.get("on_disk") == "true",
        )

    def merged(self, over: IndexChoice) -> IndexChoice:
        """This choice with every field `over` gives replaced."""
        return IndexChoice(
            *(
                theirs if theirs is not None else mine
                for mine, theirs in zip(
                    (self.index_type, self.max_index_memory, self.recall_target, self.on_disk),
                    (over.index_type, over.max_index_memory, over.recall_target, over.on_disk),
                    strict=True,
                )
            )
        )

    def plan(self, n: int, d: int, flat_limit: int = FLAT_LIMIT) -> Plan:
        return choose(
            self.index_type or "auto", n, d, self.max_index_memory, bool(self.on_disk), flat_limit
        )
