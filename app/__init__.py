"""The Gradio similar-image-search app, built on `mocoserve.index.reader` (see search.py, ui.py)."""
