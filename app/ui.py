"""`build_app(searcher)`: the Gradio Blocks of the similar-image-search page (no launch here).

Every handler treats its inputs as hostile: k, the label, the clicked index and the query
file are checked here or in `Searcher`; clicks and the random pick resolve server-side ids
(`gr.State`, which a client cannot set) through the sidecar. The gallery shows thumbnails
that mocoserve decodes itself, so Gradio never serves an indexed file by its path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import utils as gradio_utils

from mocoserve.app.search import MAX_K, Result, Searcher, SearchError

ANY_LABEL = "(any label)"
log = logging.getLogger("mocoserve.app")


def _refuse(e: SearchError) -> gr.Error:
    """A sentence for the page and one line in the log; never a traceback."""
    log.info("refused: %s", e)
    return gr.Error(str(e), print_exception=False)


def uploaded_file(payload: Any) -> str | None:
    """The path of a file Gradio received (in its upload folder), else a refusal."""
    if payload is None:
        return None
    path = Path(str(getattr(payload, "path", ""))).resolve()
    if not path.is_relative_to(Path(gradio_utils.get_upload_folder()).resolve()):
        raise _refuse(SearchError("Upload or paste an image first."))
    return str(path)


def query_image(**kwargs: Any) -> gr.Image:
    """gr.Image whose upload reaches `search` as the original file, not decoded by Gradio.

    mocoserve then decodes it exactly as `embed` decoded the index (EXIF, 16-bit, pixel
    limit), with no lossy re-save, and a bad file becomes a sentence instead of a 500.
    (Set on the instance: a subclass would make Gradio write a .pyi stub beside this file.)
    """
    image = gr.Image(type="filepath", format="png", **kwargs)
    image.preprocess = uploaded_file
    return image


def raw(component: gr.components.Component) -> gr.components.Component:
    """Hand the client's value to the handler unchecked, where it is checked with a sentence.

    (Gradio's own checks raise errors that it logs with a full traceback.)
    """
    component.preprocess = lambda payload: payload
    return component


def build_app(searcher: Searcher, default_k: int = 12) -> gr.Blocks:
    """The page: query image, k, label filter, gallery of results; `search` is also an API."""

    def show(results: list[Result]):
        gallery = [(searcher.thumbnail(r.id), r.caption) for r in results]
        status = f"{len(results)} most similar of {len(searcher.ids):,}"
        return gallery, [r.to_dict() for r in results], [r.id for r in results], status

    def label_of(label: Any) -> Any:
        return None if label == ANY_LABEL else label

    def run(image: str | None, k: Any, label: Any):
        try:
            return show(searcher.search(image, k, label_of(label)))
        except SearchError as e:
            raise _refuse(e) from None

    def by_id(item_id: int, k: Any, label: Any):
        try:
            results = searcher.search_id(item_id, k, label_of(label))
            return (searcher.thumbnail(item_id, 512), *show(results))
        except SearchError as e:
            raise _refuse(e) from None

    def pick_random(k: Any, label: Any):
        try:
            return by_id(searcher.random_id(), k, label)
        except SearchError as e:
            raise _refuse(e) from None

    def clicked(ids: list[int], k: Any, label: Any, evt: gr.SelectData):
        index = evt.index
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(ids):
            raise _refuse(SearchError("That is not one of the results."))
        return by_id(ids[index], k, label)

    with gr.Blocks(title="mocoserve · similar images") as blocks:
        gr.Markdown("## Similar-image search")
        facts = gr.Markdown(searcher.header(), elem_id="facts")
        with gr.Row():
            with gr.Column(scale=1):
                query = query_image(
                    sources=["upload", "clipboard"],
                    label="Query image",
                    elem_id="query",
                    height=260,
                )
                k = raw(gr.Slider(1, MAX_K, value=default_k, step=1, label="k", elem_id="k"))
                label = raw(
                    gr.Dropdown(
                        [ANY_LABEL, *searcher.labels],
                        value=ANY_LABEL,
                        label="Label filter",
                        visible=bool(searcher.labels),
                    )
                )
                with gr.Row():
                    search = gr.Button("Search", variant="primary", elem_id="search")
                    random_button = gr.Button("Random indexed image", elem_id="random")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(
                    label="Most similar",
                    columns=4,
                    height=640,
                    elem_id="results",
                    allow_preview=False,
                )
        results = gr.JSON(visible=False)
        ids = gr.State([])  # the shown results' ids, kept on the server

        shown = [gallery, results, ids, status]
        search.click(run, [query, k, label], shown, api_name="search")
        query.upload(run, [query, k, label], shown, api_name=False)
        random_button.click(pick_random, [k, label], [query, *shown], api_name="random")
        gallery.select(clicked, [ids, k, label], [query, *shown], api_name=False)

        def page() -> tuple[str, Any]:
            """Each page load shows the index as it is now (a service reloads it)."""
            choices = [ANY_LABEL, *searcher.labels]
            return searcher.header(), gr.update(choices=choices, visible=bool(searcher.labels))

        blocks.load(page, None, [facts, label], api_name=False)
    return blocks


class FileRouteGuard:
    """ASGI middleware for Gradio's `/file=` route: no URL proxying, no paths in refusals.

    Gradio answers a refused path with its absolute path in the body ("File not allowed:
    /srv/..."), and fetches http(s) URLs on a client's behalf; both end here.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if "/file=" not in path:
            await self.app(scope, receive, send)
            return
        target = path.split("/file=", 1)[1]
        if "://" in target or target.startswith(("http:", "https:", "//")):
            await self._refuse(send, 403)
            return
        replaced = False

        async def send_guarded(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (403, 404):
                replaced = True
                await self._refuse(send, message["status"])
                return
            if not replaced:
                await send(message)

        await self.app(scope, receive, send_guarded)

    @staticmethod
    async def _refuse(send: Any, status: int) -> None:
        body = json.dumps({"detail": "This file is not served."}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def launch_options(
    searcher: Searcher,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """`Blocks.launch` keyword arguments: serve no folder by path, bounded uploads, guarded."""
    from starlette.middleware import Middleware

    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "auth": auth,
        "allowed_paths": [],
        "max_file_size": searcher.max_upload_bytes,
        "show_error": False,
        "footer_links": ["api"],
        "quiet": True,
        "app_kwargs": {"middleware": [Middleware(FileRouteGuard)]},
    }
