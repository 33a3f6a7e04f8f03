"""What every part of mocoserve shares: errors, image decoding, the model-package format.

Imports nothing of the project outside `mocoserve.core` (a contract tests/test_imports.py checks),
so `train`, `export`, the serving path and `app` can all build on it.
"""
