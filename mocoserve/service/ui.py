"""The Gradio page at /ui, mounted in the service and searching its own model and index."""

from __future__ import annotations

from fastapi import FastAPI

from mocoserve.service.middleware import UI_PATH, key_is_valid
from mocoserve.service.state import ServiceConfig, ServiceState


def mount_ui(app: FastAPI, state: ServiceState, config: ServiceConfig) -> None:
    """Mount the page; it follows the service's index through each reload."""
    import gradio as gr

    from mocoserve.app.search import Searcher
    from mocoserve.app.ui import build_app

    searcher = Searcher(None, config.max_body_bytes)
    state.on_swap.append(lambda served: searcher.swap(served.index, served.lock))
    blocks = build_app(searcher)
    blocks.queue(default_concurrency_limit=2, max_size=256)
    keys = [key.encode() for key in config.api_keys]

    def login(_user: str, password: str) -> bool:
        return key_is_valid(password.encode(), keys)

    gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        auth=login if keys else None,
        auth_message="Log in with any name and one of the service's API keys.",
        allowed_paths=[],
        max_file_size=config.max_body_bytes,
        show_error=False,
        footer_links=["api"],
    )
