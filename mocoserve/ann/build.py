"""Building an index from (ids, vectors) blocks: new, trained on a sample, filled (in memory
or into on-disk lists), tuned. Which index to build is `mocoserve.ann.planner`'s choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from mocoserve.ann.factory import Blocks, Gather, base_ivf, new_index
from mocoserve.ann.ondisk import fill_on_disk
from mocoserve.ann.params import SearchSettings, apply_settings
from mocoserve.ann.sync import add_blocks
from mocoserve.ann.train import train, train_size
from mocoserve.ann.tune import RECALL_TARGET, tune
from mocoserve.core.errors import UserError


@dataclass
class Built:
    """An index and what tuning found."""

    index: faiss.Index
    factory: str
    settings: SearchSettings
    recall_at_10: float | None = None
    qps: float | None = None

    @property
    def nprobe(self) -> int | None:
        return self.settings.nprobe


def build(
    factory: str,
    dim: int,
    blocks: Blocks,
    train_sample: Callable[[int], np.ndarray],
    n: int,
    target: float = RECALL_TARGET,
    gather: Gather | None = None,
    lists_path: str | Path | None = None,
    tune_queries: int = 1000,
    seed: int = 0,
) -> Built:
    """Build an index from (ids, vectors) blocks; train it on a sample; tune its search.

    `blocks()` can be called more than once (tuning reads the vectors again for the exact
    neighbours); `train_sample(m)` returns m vectors drawn from the whole set; `gather(ids)`
    reads stored vectors by id (for re-ranking compressed codes). With `lists_path` the
    inverted lists are written there (`OnDiskInvertedLists`), block by block.
    """
    index = new_index(factory, dim)
    if not index.is_trained:
        ivf = base_ivf(index)
        needed = ivf.nlist if ivf is not None else 1
        if n < needed:
            raise UserError(
                f"index {factory!r} needs at least {needed} vectors to train and there are {n}; "
                "use --index-type flat or a smaller nlist"
            )
        try:
            train(index, train_sample(train_size(index, n)))
        except RuntimeError as e:  # FAISS's C++ checks: too few points for its codebooks
            reason = str(e).strip().splitlines()[-1].split("failed: ")[-1][:200]
            raise UserError(
                f"index {factory!r} cannot be trained on {n} vectors ({reason}); "
                "use --index-type auto or flat until there are more"
            ) from None
    if lists_path is not None:
        index = fill_on_disk(index, blocks(), lists_path)
    else:
        for ids, vectors in blocks():
            add_blocks(index, ids, vectors)
    settings, recall, qps = tune(index, blocks, n, target, gather, tune_queries, seed)
    apply_settings(index, settings)
    return Built(index, factory, settings, recall, qps)
