"""`build_app(searcher)`: the Gradio Blocks of the similar-image-search page (no launch here)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from mocoserve.app.search import MAX_K, Searcher, SearchError

ANY_LABEL = "(any label)"


def query_image(**kwargs: Any) -> gr.Image:
    """gr.Image whose upload reaches `search` as the original file, not decoded by Gradio.

    mocoserve then decodes it exactly as `embed` decoded the index (EXIF, 16-bit, pixel
    limit), with no lossy re-save, and a bad file becomes a sentence instead of a 500.
    (Set on the instance: a subclass would make Gradio write a .pyi stub beside this file.)
    """
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = lambda payload: None if payload is None else str(payload.path)
    return image


def build_app(searcher: Searcher, default_k: int = 12) -> gr.Blocks:
    """The page: query image, k, label filter, gallery of results; `search` is also an API."""

    def run(image: str | None, k: float, label: str | None):
        try:
            results = searcher.search(image, int(k), None if label == ANY_LABEL else label)
        except SearchError as e:
            raise gr.Error(str(e), print_exception=False) from None
        gallery = [(r.path, r.caption) for r in results]
        status = f"{len(results)} most similar of {len(searcher.index):,}"
        return gallery, [r.to_dict() for r in results], status

    def pick_random():
        try:
            path = searcher.random_path()
        except SearchError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return path

    def clicked(results: list[dict[str, Any]], k: float, label: str | None, evt: gr.SelectData):
        path = results[evt.index]["file"]
        return (path, *run(path, k, label))

    with gr.Blocks(title="mocoserve · similar images") as blocks:
        gr.Markdown("## Similar-image search")
        gr.Markdown(searcher.header(), elem_id="facts")
        with gr.Row():
            with gr.Column(scale=1):
                query = query_image(
                    sources=["upload", "clipboard"],
                    label="Query image",
                    elem_id="query",
                    height=260,
                )
                k = gr.Slider(1, MAX_K, value=default_k, step=1, label="k", elem_id="k")
                label = gr.Dropdown(
                    [ANY_LABEL, *searcher.labels],
                    value=ANY_LABEL,
                    label="Label filter",
                    visible=bool(searcher.labels),
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

        search.click(run, [query, k, label], [gallery, results, status], api_name="search")
        query.upload(run, [query, k, label], [gallery, results, status], api_name=False)
        random_button.click(pick_random, None, query, api_name="random").then(
            run, [query, k, label], [gallery, results, status], api_name=False
        )
        gallery.select(
            clicked, [results, k, label], [query, gallery, results, status], api_name=False
        )
    return blocks


def launch_options(
    searcher: Searcher,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """`Blocks.launch` keyword arguments: serve only the indexed folders, bounded uploads."""
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "auth": auth,
        "allowed_paths": searcher.roots,
        "max_file_size": searcher.max_upload_bytes,
        "show_error": False,
        "footer_links": ["api"],
        "quiet": True,
    }
