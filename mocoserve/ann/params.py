"""Search-time parameters (nprobe, efSearch, re-rank factor): kept, described, set on an index.

They are set through `faiss.ParameterSpace` names, the same way for every index type and for
the GPU (autofaiss's way), or carried per call in `faiss.SearchParameters` with a selector.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss

from mocoserve.ann.factory import base_ivf, inner


@dataclass
class SearchSettings:
    """Search-time parameters, as tuned: nprobe (IVF), efSearch (HNSW graph or the HNSW
    coarse quantizer), k_factor (re-rank k * k_factor candidates with the stored vectors)."""

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int = 1

    def to_meta(self) -> dict[str, str]:
        return {
            "nprobe": str(self.nprobe or ""),
            "ef_search": str(self.ef_search or ""),
            "k_factor": str(self.k_factor),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> SearchSettings:
        def num(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value else None

        return cls(num("nprobe"), num("ef_search"), num("k_factor") or 1)

    def describe(self) -> str:
        parts = []
        if self.nprobe:
            parts.append(f"nprobe {self.nprobe}")
        if self.ef_search:
            parts.append(f"efSearch {self.ef_search}")
        if self.k_factor > 1:
            parts.append(f"re-rank x{self.k_factor}")
        return ", ".join(parts)


def param_names(index: faiss.Index) -> dict[str, int]:
    """Which ParameterSpace names the settings map to, for this index (none: nothing to tune)."""
    names = {}
    ivf = base_ivf(index)
    if ivf is not None:
        names["nprobe"] = 1
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            names["quantizer_efSearch"] = 1
    elif isinstance(inner(index), faiss.IndexHNSW):
        names["efSearch"] = 1
    return names


def apply_settings(
    index: faiss.Index, settings: SearchSettings, space=None, like: faiss.Index | None = None
) -> None:
    """Set nprobe / efSearch through `faiss.ParameterSpace` (GpuParameterSpace on a GPU).

    `like`: the CPU index a GPU copy was made from (which names apply is read from it;
    GpuParameterSpace walks replicas and shards itself).
    """
    space = space or faiss.ParameterSpace()
    names = param_names(like if like is not None else index)
    if "nprobe" in names and settings.nprobe:
        space.set_index_parameter(index, "nprobe", int(settings.nprobe))
    if settings.ef_search:
        for name in ("quantizer_efSearch", "efSearch"):
            if name in names:
                space.set_index_parameter(index, name, int(settings.ef_search))


def search_params(
    index: faiss.Index, settings: SearchSettings, selector: faiss.IDSelector | None
) -> faiss.SearchParameters | None:
    """Per-call parameters carrying a selector and the same nprobe / efSearch."""
    if selector is None:
        return None
    ivf = base_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=settings.nprobe or ivf.nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            params.quantizer_params = faiss.SearchParametersHNSW(
                efSearch=settings.ef_search or quantizer.hnsw.efSearch
            )
        return params
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(
            sel=selector, efSearch=settings.ef_search or base.hnsw.efSearch
        )
    return faiss.SearchParameters(sel=selector)
