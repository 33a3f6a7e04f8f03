"""TorchScript without its deprecation noise (export writes encoder.pt, the loader reads it)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript still works in torch 2.x; its deprecation warnings are noise to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
        yield
