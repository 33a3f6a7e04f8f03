"""The Gradio similar-image-search app, built on `mocoserve.index` (see search.py, ui.py)."""
