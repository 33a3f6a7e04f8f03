"""`mocoserve knn`: embed labelled folders (or reuse an index), classify by k-NN, report.

The report folder gets report.json (every figure), report.md (tables), confusion.png and
neighbours.png (queries with their nearest training images, framed green or red).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from mocoserve.ann import knn
from mocoserve.core.errors import UserError
from mocoserve.core.images import load_rgb
from mocoserve.core.manifest import model_fingerprint
from mocoserve.core.tars import split_item_key
from mocoserve.index.catalog import CatalogMeta
from mocoserve.index.files import IndexFiles
from mocoserve.index.formats import open_store
from mocoserve.index.items import ItemGone, member_bytes
from mocoserve.ingest.embed import embed_folders


@dataclass
class LabelledSet:
    """Embeddings of a labelled image set, read back from an index's store."""

    paths: list[str]
    labels: list[str]
    vectors: np.ndarray
    failed: int = 0
    unlabelled: int = 0
    model_path: str | None = None  # the model package the index was built with


def read_labelled(index_path: Path, paths_under: Path | None = None) -> LabelledSet:
    """Every labelled item of an index (optionally only those under a folder)."""
    if not IndexFiles(index_path).catalog.is_file():
        raise UserError(f"{index_path} is not an index (no {IndexFiles(index_path).catalog.name})")
    store = open_store(index_path)
    try:
        model_path = CatalogMeta.of(store).model_path
        prefix = str(paths_under.resolve()) + "/" if paths_under else ""
        paths, labels, vectors = store.under(prefix)
        failed = sum(1 for p, _ in store.failures() if p.startswith(prefix))
    finally:
        store.close()
    keep = [i for i, label in enumerate(labels) if label is not None]
    return LabelledSet(
        [paths[i] for i in keep],
        [labels[i] for i in keep],  # type: ignore[misc]
        vectors[keep],
        failed,
        len(paths) - len(keep),
        model_path,
    )


@dataclass
class KnnReport:
    """Everything report.json holds, plus where the files are."""

    out: Path
    figures: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def run_knn(
    model: Path | None,
    train: Path | None,
    val: Path | None,
    out: Path,
    train_index: Path | None = None,
    k: int | None = None,
    temperature: float | None = None,
    preset: str = "dino",
    loo: bool = False,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int = 64,
    grid_queries: int = 8,
    baseline: dict[str, float] | None = None,
) -> KnnReport:
    """Classify `val` (or `train` leave-one-out) by k-NN against `train` and write the report."""
    k, temperature, ks = _preset_k(preset, k, temperature)
    _check_inputs(train, val, out, train_index, loo)
    started = time.perf_counter()
    sets = _embedded_sets(model, train, val, out, train_index, loo, device, workers, batch_size)
    train_set, val_set = sets.train_set, sets.val_set
    if not train_set.labels:
        raise UserError(f"{train} has no labelled images (expected class/image folders)")
    if not val_set.labels:
        raise UserError(f"{val} has no labelled images (expected class/image folders)")

    classes = sorted(set(train_set.labels))
    missing = sorted(set(val_set.labels) - set(classes))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"val classes missing from the train set: {shown}")
    class_id = {c: i for i, c in enumerate(classes)}
    train_labels = np.array([class_id[c] for c in train_set.labels], dtype=np.int64)
    val_labels = np.array([class_id[c] for c in val_set.labels], dtype=np.int64)
    if train_set.vectors.shape[1] != val_set.vectors.shape[1]:
        raise UserError("--train-index was built with a model of another embedding size")
    self_ids = np.arange(len(val_labels)) if loo else None
    k, ks, notes = _capped_k(k, ks, len(train_labels), loo)
    result = knn.knn_classify(
        train_set.vectors,
        train_labels,
        val_set.vectors,
        len(classes),
        ks,
        temperature,
        self_ids,
        device=device,
    )
    figures = _figures(result, k, val_labels, classes, train_set, val_set, loo, preset)
    figures["model"] = {
        "path": str(Path(sets.model).resolve()),
        "manifest_sha256": sets.fingerprint,
    }
    figures["train"] = str(train if train is not None else sets.train_index)
    figures["val"] = "leave-one-out on train" if loo else str(val)
    figures["indexes"] = {"train": str(sets.train_index), "val": str(sets.val_index)}
    if baseline:
        figures["baseline"] = baseline
    figures["seconds"] = round(time.perf_counter() - started, 2)
    figures["notes"] = notes
    figures["embedded"] = sets.embedded
    report = KnnReport(out, figures)
    report.files = write_report(
        out, figures, result, k, val_labels, classes, train_set, val_set, train_labels, grid_queries
    )
    return report


def _preset_k(
    preset: str, k: int | None, temperature: float | None
) -> tuple[int, float, tuple[int, ...]]:
    """(k, temperature, the ks to report): the preset's, unless given."""
    if preset not in knn.PRESETS:
        raise UserError(f"--preset must be one of {', '.join(knn.PRESETS)}, got {preset!r}")
    p = knn.PRESETS[preset]
    k = p["k"] if k is None else k
    temperature = p["temperature"] if temperature is None else temperature
    if k < 1 or temperature <= 0:
        raise UserError("--k must be at least 1 and --temperature above 0")
    ks = tuple(sorted({k, *p["ks"]})) if k == p["k"] else (k,)
    return k, temperature, ks


def _check_inputs(
    train: Path | None, val: Path | None, out: Path, train_index: Path | None, loo: bool
) -> None:
    if loo and val is not None:
        raise UserError("--loo classifies the --train folder against itself; drop --val")
    if not loo and val is None:
        raise UserError("give --val (a labelled folder), or --loo to use --train alone")
    if train is None and train_index is None:
        raise UserError("give --train (a labelled folder) or --train-index (an index with labels)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report")
    # the folders are checked here and --out is made only when there is something to write
    # in it (the cache of embeddings, the report): a refused run leaves no empty folder
    for option, folder in (("--train", None if train_index else train), ("--val", val)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{option} {folder} is not a folder")


@dataclass
class _Sets:
    """The train and val sets of a run, the model that embedded them, and their indexes."""

    model: Path
    fingerprint: str
    train_set: LabelledSet
    val_set: LabelledSet
    train_index: Path
    val_index: Path
    embedded: dict[str, int]  # what this run had to embed (the cache holds the rest)


def _embedded_sets(
    model: Path | None,
    train: Path | None,
    val: Path | None,
    out: Path,
    train_index: Path | None,
    loo: bool,
    device: str,
    workers: int | None,
    batch_size: int,
) -> _Sets:
    """The labelled sets: read from --train-index, or embedded into out/index (a cache)."""
    train_set = None
    if train_index is not None:
        train_set = read_labelled(train_index)
        if model is None and train_set.model_path:
            model = Path(train_set.model_path)
        if not train_set.labels:
            raise UserError(f"{train_index} has no labels; build it with --labels-from-folders")
    if model is None:
        raise UserError(
            "give --model (the package folder made by export), or --train-index (an index "
            "that knows its model)"
        )
    if not (Path(model) / "manifest.json").is_file():
        raise UserError(f"--model {model} is not a model package folder (no manifest.json)")
    fingerprint = model_fingerprint(model)
    cache = out / "index"
    embedded = {"train": 0, "val": 0}
    if train_index is None:
        train_index = cache / f"train-{fingerprint[:12]}.faiss"
        cache.mkdir(parents=True, exist_ok=True)
        done = embed_folders([train], model, train_index, batch_size, workers, "flat", True, device)
        embedded["train"] = done.embedded
        train_set = read_labelled(train_index, train)
    assert train_set is not None
    if loo:
        val_set, val_index = train_set, train_index
    else:
        val_index = cache / f"val-{fingerprint[:12]}.faiss"
        cache.mkdir(parents=True, exist_ok=True)
        done = embed_folders([val], model, val_index, batch_size, workers, "flat", True, device)
        embedded["val"] = done.embedded
        val_set = read_labelled(val_index, val)
    return _Sets(model, fingerprint, train_set, val_set, train_index, val_index, embedded)


def _capped_k(
    k: int, ks: tuple[int, ...], n_train: int, loo: bool
) -> tuple[int, tuple[int, ...], list[str]]:
    """k and the ks no larger than the neighbours a query can have; a note when capped."""
    most = n_train - (1 if loo else 0)  # neighbours a query can have
    if most < 1:
        raise UserError("the train set needs at least one image (two for --loo)")
    notes = []
    over = sorted(kk for kk in ks if kk > most)
    if over:
        asked = ", ".join(map(str, over))
        notes.append(f"k capped at {most}: the train set has {n_train} images (k {asked})")
    return min(k, most), tuple(sorted({min(kk, most) for kk in ks})), notes


def _figures(result, k, val_labels, classes, train_set, val_set, loo, preset) -> dict[str, Any]:
    top1, top5 = result.accuracy(val_labels, k)
    predicted = result.top5[k][:, 0]
    matrix = knn.confusion(val_labels, predicted, len(classes))
    per_class = []
    for i, name in enumerate(classes):
        n = int(matrix[i].sum())
        if n:
            per_class.append({"class": name, "n": n, "top1": round(100 * matrix[i, i] / n, 2)})
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = [
        {"true": classes[t], "predicted": classes[p], "count": int(off[t, p])}
        for t, p in zip(*np.unravel_index(np.argsort(-off, axis=None)[:10], off.shape), strict=True)
        if off[t, p] > 0
    ]
    return {
        "preset": preset,
        "k": k,
        "temperature": result.temperature,
        "weighting": "exp(sim / T)",
        "top1": round(top1, 3),
        "top5": round(top5, 3),
        "by_k": {
            str(kk): dict(
                zip(
                    ("top1", "top5"),
                    map(lambda v: round(v, 3), result.accuracy(val_labels, kk)),
                    strict=True,
                )
            )
            for kk in result.ks
        },
        "counts": {
            "train": len(train_set.paths),
            "val": len(val_set.paths),
            "classes": len(classes),
            "val_classes": len(set(val_set.labels)),
            "train_failed": train_set.failed,
            "val_failed": val_set.failed,
            "unlabelled_skipped": train_set.unlabelled + (0 if loo else val_set.unlabelled),
        },
        "leave_one_out": loo,
        "per_class": per_class,
        "most_confused": pairs,
        "classes": classes,
        "confusion": matrix.tolist(),
    }


def write_report(
    out, figures, result, k, val_labels, classes, train_set, val_set, train_labels, grid_queries
) -> dict[str, Path]:
    """report.json, report.md, confusion.png, neighbours.png; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "confusion": out / "confusion.png",
        "neighbours": out / "neighbours.png",
    }
    files["json"].write_text(json.dumps(figures, indent=2) + "\n")
    files["markdown"].write_text(_markdown(figures))
    confusion_png(np.array(figures["confusion"]), classes).save(files["confusion"])
    neighbours_png(
        result, k, val_labels, train_labels, train_set, val_set, classes, grid_queries
    ).save(files["neighbours"])
    return files


def _markdown(f: dict[str, Any]) -> str:
    c = f["counts"]
    lines = [
        "# k-NN report",
        "",
        f"Model `{f['model']['path']}` (manifest sha256 `{f['model']['manifest_sha256'][:16]}…`).",
        f"Train: {f['train']} ({c['train']} images, {c['classes']} classes). "
        f"Val: {f['val']} ({c['val']} images, {c['val_classes']} classes).",
        f"Weighted k-NN: cosine similarity, each of the k nearest votes exp(sim / T); "
        f"k = {f['k']}, T = {f['temperature']} (preset {f['preset']}).",
        "",
        "| k | top-1 % | top-5 % |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {kk} | {v['top1']:.2f} | {v['top5']:.2f} |" for kk, v in f["by_k"].items()]
    if "baseline" in f:
        lines += ["", "| network | top-1 % |", "| --- | ---: |"]
        lines += [f"| {name} | {v:.2f} |" for name, v in f["baseline"].items()]
        lines.append(f"| this model | {f['top1']:.2f} |")
    lines += ["", "## Per class", "", "| class | images | top-1 % |", "| --- | ---: | ---: |"]
    lines += [f"| {p['class']} | {p['n']} | {p['top1']:.2f} |" for p in f["per_class"]]
    lines += ["", "## Most confused", ""]
    if f["most_confused"]:
        lines += ["| true | predicted as | count |", "| --- | --- | ---: |"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in f["most_confused"]]
    else:
        lines.append("No confusions.")
    skipped = c["train_failed"] + c["val_failed"] + c["unlabelled_skipped"]
    if skipped:
        lines += [
            "",
            f"Skipped: {c['train_failed']} train and {c['val_failed']} val files "
            f"that could not be decoded, {c['unlabelled_skipped']} without a class folder.",
        ]
    lines += [
        "",
        "Pictures: `confusion.png` (rows: true class, row-normalised) and "
        "`neighbours.png` (queries left, nearest training images right; green: same "
        "class, red: another).",
    ]
    return "\n".join(lines) + "\n"


def short(name: str, n: int = 16) -> str:
    """A class name in at most n characters, keeping both ends (`a-rathe..class_3`)."""
    if len(name) <= n:
        return name
    tail = (n - 2) // 2
    return f"{name[: n - 2 - tail]}..{name[-tail:]}"


def _text_block(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str]) -> int:
    """Draw lines of text from xy; return the height they took."""
    x, y = xy
    for line in lines:
        draw.text((x, y), line, fill="black")
        y += 13
    return y - xy[1]


def _wrapped(text: str, width_px: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, max(20, width_px // 6))  # PIL's default font: ~6 px a glyph


def confusion_png(matrix: np.ndarray, classes: list[str]) -> Image.Image:
    """A row-normalised confusion matrix: white (0) to dark blue (1), with class names.

    Rows are true classes, columns predicted ones; counts are written in cells big enough.
    Names longer than 16 characters keep both ends, so similar long names stay apart.
    """
    n = len(classes)
    cell = max(4, min(48, 720 // max(n, 1)))
    named = n <= 60
    labels = [short(c) for c in classes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textbbox((0, 0), s)[2] for s in labels), default=0) if named else 0
    left = 8 + text_w + 6
    title_h = 30
    top = title_h + text_w + 8  # room for the rotated column names
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    shade = (255 - rows[..., None] * np.array([200, 160, 90])).clip(0, 255)  # n x n x 3
    heat = Image.fromarray(shade.astype(np.uint8), "RGB").resize(
        (n * cell, n * cell), Image.NEAREST
    )
    width = max(left + n * cell + 8, 330)
    image = Image.new("RGB", (width, top + n * cell + 8), "white")
    image.paste(heat, (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 3), "confusion: rows = true class, columns = predicted", fill="black")
    draw.text((4, 16), "row-normalised: dark = most of the class's images", fill="grey")
    if named:
        for i, label in enumerate(labels):
            draw.text((4, top + i * cell + cell // 2 - 5), label, fill="black")
            strip = Image.new("RGB", (text_w + 2, 12), "white")
            ImageDraw.Draw(strip).text((0, 0), label, fill="black")
            rotated = strip.rotate(90, expand=True)  # reads bottom to top, ends at the matrix
            image.paste(rotated, (left + i * cell + cell // 2 - 6, top - rotated.height - 4))
        if cell >= 24:
            for r in range(n):
                for c in range(n):
                    if matrix[r, c]:
                        colour = "white" if rows[r, c] > 0.5 else "black"
                        xy = (left + c * cell + 3, top + r * cell + cell // 2 - 5)
                        draw.text(xy, str(matrix[r, c]), fill=colour)
    return image


def _thumb(path: str, size: int, frame: str) -> Image.Image:
    try:
        where = split_item_key(path)  # a tar member: its bytes at their offset in the shard
        source = path if where is None else io.BytesIO(member_bytes(*where))
        image = ImageOps.fit(load_rgb(source), (size - 6, size - 6))
    except (OSError, ValueError, ItemGone):
        image = Image.new("RGB", (size - 6, size - 6), "grey")
    return ImageOps.expand(image, border=3, fill=frame)


QUERY, SAME, OTHER = "#3060c0", "#20a040", "#d02020"


def neighbours_png(
    result,
    k,
    val_labels,
    train_labels,
    train_set,
    val_set,
    classes,
    queries: int,
    shown: int = 6,
    size: int = 72,
) -> Image.Image:
    """One row per query (one per class first, then misclassified ones): query + neighbours.

    A header says what the frames mean and that the vote used k neighbours, of which only
    the nearest few are drawn (so a wrong row can show only green frames).
    """
    predicted = result.top5[k][:, 0]
    picks: list[int] = []
    for c in np.unique(val_labels):
        picks.append(int(np.flatnonzero(val_labels == c)[0]))
    wrong = [int(i) for i in np.flatnonzero(predicted != val_labels) if int(i) not in picks]
    picks = (picks[: max(1, queries // 2)] + wrong)[:queries]
    if len(picks) < queries:
        picks += [i for i in range(len(val_labels)) if i not in picks][: queries - len(picks)]
    shown = min(shown, result.rows.shape[1])
    width = (shown + 1) * size + 12
    header = _wrapped(
        f"Each row: a query (blue frame), then its {shown} nearest training images with "
        f"their cosine similarity; green frame = same class as the query, red = another. "
        f"The prediction is the weighted vote of the k = {k} nearest (T = "
        f"{result.temperature}), so it can differ from the few drawn here. Below each "
        "query: its class -> the predicted class.",
        width - 8,
    )
    header_h = 13 * len(header) + 8
    label_h = 14
    image = Image.new("RGB", (width, header_h + len(picks) * (size + label_h)), "white")
    draw = ImageDraw.Draw(image)
    _text_block(draw, (4, 3), header)
    for r, q in enumerate(picks):
        y = header_h + r * (size + label_h)
        image.paste(_thumb(val_set.paths[q], size, QUERY), (0, y))
        truth, guess = classes[val_labels[q]], classes[predicted[q]]
        verdict = (
            f"{short(truth, 10)} ok" if guess == truth else f"{short(truth, 9)}->{short(guess, 9)}"
        )
        draw.text((2, y + size), verdict, fill="black" if guess == truth else OTHER)
        for j in range(shown):
            row = int(result.rows[q, j])
            same = train_labels[row] == val_labels[q]
            x = (j + 1) * size + 12
            image.paste(_thumb(train_set.paths[row], size, SAME if same else OTHER), (x, y))
            draw.text((x + 2, y + size), f"{result.sims[q, j]:.2f}", fill="black")
    return image
