"""Pictures of a run: overlay panels (image | ground truth | prediction) and a self-contained
HTML report (inline SVG charts and PNG overlays, nothing to fetch).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from fcn.metrics import PAPER_METRICS
from pipeline.data.decode import DecodeError, decode_image, decode_mask
from pipeline.data.scenes import probe
from pipeline.errors import InputError
from pipeline.results.output import errors_text, format_score
from pipeline.results.reader import ImageScore, Results, RunSummary
from pipeline.storage import read_bytes, resolve, write_bytes

__all__ = ["DEFAULT_ALPHA", "Panel", "overlay_panel", "panels", "render_html", "write_html_report"]

DEFAULT_ALPHA = 0.6
"""Weight of the class colour in the ground-truth and prediction overlays."""

SHOW_MAX_PIXELS = 1_000_000_000
"""Largest untiled image (JPEG, PNG) a huge image's overlay decodes whole: segmentation's own
``max_scene_pixels`` default."""
_MAX_ERROR_ROWS = 20
_READ_THREADS = 8


@dataclass(frozen=True, eq=False)
class Panel:
    """An overlay panel: image | ground truth | prediction (image | prediction without mask)."""

    image_id: str
    """The image shown."""
    pixels: np.ndarray
    """(H, 3W, 3) uint8 RGB, or (H, 2W, 3) without ground truth."""
    has_ground_truth: bool
    """Whether the middle part is the ground truth."""
    mean_iou: float | None
    """The image's mean IoU in the run; None where it has no mask."""

    @property
    def parts(self) -> str:
        """What the panel shows, left to right."""
        return (
            "image | ground truth | prediction" if self.has_ground_truth else "image | prediction"
        )

    def to_png(self) -> bytes:
        """The panel as PNG bytes."""
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def panels(
    results: Results, run_id: str, image_ids: Sequence[str], *, alpha: float = DEFAULT_ALPHA
) -> list[Panel]:
    """Overlay panels, image | ground truth | prediction, in the order of ``image_ids``.

    The image comes from ``predictions.image_uri``, the prediction from its ``label_map``, the
    mask from the manifest of the run's input (image | prediction where there is none).

    Args:
        results: The output root.
        run_id: A committed segment run.
        image_ids: Images it segmented.
        alpha: Weight of the class colours.

    Raises:
        ImageNotFoundError: An image without a prediction in the run.
    """
    from fcn.palette import decode_label_png, overlay  # imports torch: only here

    found = results.predictions(run_id, image_ids, ["image_uri", "label_map", "label_map_uri"])
    masks = results.mask_uris(results.summary(run_id).input_uri)
    scores = {
        r["image_id"]: r["mean_iou"]
        for r in results.image_scores(run_id).select(["image_id", "mean_iou"]).to_pylist()
    }
    options = results.options

    def fetch(image_id: str) -> tuple[bytes | np.ndarray, bytes | np.ndarray | None]:
        mask_uri = masks.get(image_id)
        if found[image_id]["label_map_uri"] is not None:  # a tiled run's huge image
            return _sampled(found[image_id], mask_uri, options)
        image = read_bytes(resolve(found[image_id]["image_uri"], options))
        return image, None if mask_uri is None else read_bytes(resolve(mask_uri, options))

    # Concurrent reads: on object storage each one is a round trip.
    with ThreadPoolExecutor(max(1, min(_READ_THREADS, len(image_ids)))) as pool:
        fetched = list(pool.map(fetch, image_ids))
    out = []
    for image_id, (image_bytes, mask_bytes) in zip(image_ids, fetched, strict=True):
        if isinstance(image_bytes, np.ndarray):
            image = image_bytes
        else:
            image = _decoded(found[image_id]["image_uri"], image_bytes)
        height, width = image.shape[:2]
        label = _fit(decode_label_png(found[image_id]["label_map"]), height, width)
        parts = [image]
        if mask_bytes is not None:
            if isinstance(mask_bytes, np.ndarray):
                mask = mask_bytes
            else:
                try:
                    mask = decode_mask(mask_bytes, height=height, width=width, num_classes=None)
                except DecodeError as exc:
                    raise InputError(f"{masks[image_id]}: {exc}") from None
            parts.append(overlay(image, mask, alpha))
        parts.append(overlay(image, label, alpha))
        out.append(
            Panel(
                image_id=image_id,
                pixels=np.concatenate(parts, axis=1),
                has_ground_truth=mask_bytes is not None,
                mean_iou=scores.get(image_id),
            )
        )
    return out


def overlay_panel(
    results: Results, run_id: str, image_id: str, *, alpha: float = DEFAULT_ALPHA
) -> Panel:
    """One image's overlay panel (see :func:`panels`).

    Args:
        results: The output root.
        run_id: A committed segment run.
        image_id: An image it segmented.
        alpha: Weight of the class colours.
    """
    return panels(results, run_id, [image_id], alpha=alpha)[0]


def _sampled(
    found: dict[str, Any], mask_uri: str | None, options: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """A huge image and its mask sampled as its label map's preview is (every ``step``-th
    row and column): the overlay of a tiled run, never the whole image in memory."""
    from pipeline.data.scenes import thumbnail
    from pipeline.segment.tiles import PREVIEW_SIDE

    uri = found["image_uri"]
    try:
        info = probe(resolve(uri, options))
        step = max(1, -(-max(info.height, info.width) // PREVIEW_SIDE))
        image = thumbnail(resolve(uri, options), step, channels=3, max_pixels=SHOW_MAX_PIXELS)
        mask = None
        if mask_uri is not None:
            where = resolve(mask_uri, options)
            mask = thumbnail(
                where, step, channels=1, max_pixels=SHOW_MAX_PIXELS, stage="decode_mask"
            )
    except DecodeError as exc:
        raise InputError(f"{exc}") from None
    return image, mask


def _decoded(uri: str, data: bytes) -> np.ndarray:
    try:
        return decode_image(data)
    except DecodeError as exc:
        raise InputError(f"{uri}: {exc}") from None


def _fit(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map at the image's size (nearest neighbour, for maps made at another size)."""
    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


def write_html_report(
    results: Results,
    run_id: str,
    path: str,
    *,
    num_images: int = 4,
    alpha: float = DEFAULT_ALPHA,
) -> str:
    """Write one self-contained HTML file about a run (see :func:`render_html`).

    Args:
        results: The output root.
        run_id: A committed run.
        path: Where to write (path or URI; storage options as the output root's).
        num_images: Best and worst images shown.
        alpha: Weight of the class colours in the overlays.

    Returns:
        The URI written.
    """
    text = render_html(results, run_id, num_images=num_images, alpha=alpha)
    target = resolve(path, results.options)
    write_bytes(target, text.encode())
    return target.uri


def render_html(
    results: Results, run_id: str, *, num_images: int = 4, alpha: float = DEFAULT_ALPHA
) -> str:
    """A run's report as one HTML page with nothing to fetch: no scripts, inline SVG charts,
    PNG overlays as data URIs.

    Sections: the run's facts and the paper's metrics; the per-class IoU bar chart
    (``svg#class-iou-chart``); training curves (``#training-curves``: train loss and val
    mean IoU by epoch) when the model's training rows are under the root; the best and worst
    ``num_images`` images as overlays (``#best-images``, ``#worst-images``, each a
    ``figure.overlay``), or the first images where none has a mask; the run's errors.

    Args:
        results: The output root.
        run_id: A committed run.
        num_images: Best and worst images shown.
        alpha: Weight of the class colours in the overlays.
    """
    s = results.summary(run_id)
    parts = [f"<h1>Run {_h(run_id)}</h1>", _facts_html(s, results.out_uri), _metrics_html(s)]
    parts.append('<section id="class-iou"><h2>IoU per class</h2>')
    if s.class_iou:
        parts.append(_class_iou_svg(s.class_names, s.class_iou, s.scores.get("mean_iou")))
    else:
        parts.append("<p>No scores: no image of the input had a mask.</p>")
    parts.append("</section>")
    parts.append(_training_html(s, results.training(run_id)))
    parts.append(_images_html(results, s, num_images, alpha))
    if s.num_errors:
        parts.append(_errors_html(results.errors(run_id, _MAX_ERROR_ROWS), s.num_errors))
    return _page(f"fcnpipe report: {run_id}", "\n".join(parts))


def _h(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; background: #fff; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; } th, td { padding: .25rem .7rem; text-align: left;
        border-bottom: 1px solid #eee; } td.num, th.num { text-align: right;
        font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; word-break: break-all; }
svg.chart { background: #fff; } svg.chart text { font-size: 12px; fill: #333; }
.curves { display: flex; flex-wrap: wrap; gap: 1.5rem; }
.overlays { display: flex; flex-wrap: wrap; gap: 1.2rem; }
figure.overlay { margin: 0; } figure.overlay img { display: block; max-width: 100%;
                 height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: .85rem; color: #444; margin-top: .2rem; }
.legend { font-size: .85rem; } .legend .item { margin-right: 1rem; white-space: nowrap; }
.swatch { display: inline-block; width: .9em; height: .9em; margin-right: .3em;
          vertical-align: middle; border: 1px solid #888; }
p.note { color: #666; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        '<p class="note">Written by fcnpipe report.</p>\n</body>\n</html>\n'
    )


def _facts_html(s: RunSummary, out_uri: str) -> str:
    speed = f"{s.images_per_s:.1f}" if s.images_per_s is not None else "-"
    seconds = (s.finished_at - s.started_at).total_seconds()
    facts = [
        ("output root", out_uri),
        ("kind", s.kind),
        ("input", s.input_uri or "-"),
        ("model", s.model_uri or "-"),
        ("training run", s.training_run_id or "not under this output root"),
        ("images", f"{s.num_images} ({errors_text(s.num_errors)})"),
        ("finished", f"{s.finished_at:%Y-%m-%d %H:%M:%S} UTC ({seconds:.0f} s)"),
        ("images/s", speed),
    ]
    rows = "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in facts)
    return f'<dl class="facts" id="facts">{rows}</dl>'


def _metrics_html(s: RunSummary) -> str:
    head = "".join(f'<th class="num">{_h(t)}</th>' for t in PAPER_METRICS.values())
    cells = "".join(f'<td class="num">{format_score(s.scores.get(k))}</td>' for k in PAPER_METRICS)
    where = "val split" if s.kind == "train" else "images with masks"
    return (
        f'<section id="metrics"><h2>Metrics ({_h(where)})</h2>'
        f'<table id="paper-metrics"><tr><th>run</th>{head}</tr>'
        f"<tr><td>{_h(s.run_id)}</td>{cells}</tr></table></section>"
    )


def _class_iou_svg(
    names: Sequence[str], iou: Sequence[float | None], mean_iou: float | None
) -> str:
    """Horizontal bars, one per class, on a 0..1 axis, with the mean IoU as a dashed line."""
    label_w, bar_w, row_h, top = 150, 400, 22, 10
    width, height = label_w + bar_w + 70, top + row_h * len(names) + 30
    bottom = top + row_h * len(names)
    out = [
        f'<svg id="class-iou-chart" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="IoU per class">',
        "<title>IoU per class</title>",
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = label_w + tick * bar_w
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{tick:g}</text>')
    for i, (name, value) in enumerate(zip(names, iou, strict=True)):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{_h(name)}</text>')
        if value is None or math.isnan(value):
            out.append(f'<text x="{label_w + 4}" y="{y + 15}" fill="#999">absent</text>')
            continue
        w = max(0.0, min(1.0, value)) * bar_w
        out.append(
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="#4e79a7"><title>{_h(name)}: {value:.3f}</title></rect>'
        )
        out.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 15}">{value:.3f}</text>')
    if mean_iou is not None and not math.isnan(mean_iou):
        x = label_w + max(0.0, min(1.0, mean_iou)) * bar_w
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e15759" '
            'stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 28}" text-anchor="middle" fill="#e15759">'
            f"mean {mean_iou:.3f}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _line_svg(
    title: str,
    epochs: Sequence[int],
    values: Sequence[float | None],
    color: str,
    y_max: float | None = None,
) -> str:
    """One small line chart of a value by epoch (nulls left out)."""
    width, height, left, right, top, bottom = 340, 230, 50, 15, 28, 36
    points = [
        (e, v) for e, v in zip(epochs, values, strict=True) if v is not None and math.isfinite(v)
    ]
    top_value = y_max if y_max is not None else max([v for _, v in points] + [1e-9]) * 1.1
    lo, hi = min(epochs, default=0), max(epochs, default=1)
    span = hi - lo

    def x_of(epoch: int) -> float:
        inner = width - left - right
        return left + (inner / 2 if span == 0 else (epoch - lo) / span * inner)

    def y_of(value: float) -> float:
        return top + (1 - value / top_value) * (height - top - bottom)

    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_h(title)}"><title>{_h(title)}</title>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{_h(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        'stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
    ]
    for tick in (0.0, top_value / 2, top_value):
        y = y_of(tick)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    step = max(1, math.ceil((span + 1) / 8))
    for epoch in range(lo, hi + 1, step):
        out.append(
            f'<text x="{x_of(epoch):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
            f"{epoch}</text>"
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">epoch</text>'
    )
    if points:
        coords = " ".join(f"{x_of(e):.1f},{y_of(v):.1f}" for e, v in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        for e, v in points:
            out.append(
                f'<circle cx="{x_of(e):.1f}" cy="{y_of(v):.1f}" r="3" fill="{color}">'
                f"<title>epoch {e}: {v:.4g}</title></circle>"
            )
    else:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values</text>')
    out.append("</svg>")
    return "".join(out)


def _training_html(s: RunSummary, history: pa.Table) -> str:
    if not history.num_rows:
        why = (
            f"the model {s.model_uri} was not trained under this output root"
            if s.training_run_id is None
            else f"run {s.training_run_id} has no training rows"
        )
        return (
            '<section id="training"><h2>Training</h2>'
            f'<p class="note">No curves: {_h(why)}.</p></section>'
        )
    epochs = [int(e) for e in history["epoch"].to_pylist()]
    loss = _line_svg("train loss", epochs, history["train_loss"].to_pylist(), "#4e79a7")
    iou = _line_svg("val mean IoU", epochs, history["val_mean_iou"].to_pylist(), "#59a14f", 1.0)
    return (
        '<section id="training"><h2>Training</h2>'
        f"<p>Run {_h(s.training_run_id)}, {len(epochs)} epochs.</p>"
        f'<div id="training-curves" class="curves">{loss}{iou}</div></section>'
    )


def _legend_html(class_names: Sequence[str]) -> str:
    from fcn.palette import voc_palette

    colours = voc_palette(max(1, len(class_names)))
    items = "".join(
        f'<span class="item"><span class="swatch" style="background: rgb({r},{g},{b})"></span>'
        f"{_h(name)}</span>"
        for name, (r, g, b) in zip(class_names, colours.tolist(), strict=True)
    )
    return f'<p class="legend">{items}</p>'


def _figure_html(panel: Panel, score: ImageScore | None) -> str:
    height, width = panel.pixels.shape[:2]
    scale = max(1, math.ceil(160 / height))
    data = base64.b64encode(panel.to_png()).decode()
    caption = f"<b>{_h(panel.image_id)}</b>"
    if score is not None:
        caption += (
            f" · mean IoU {format_score(score.mean_iou)}"
            f" · pixel acc {format_score(score.pixel_acc)}"
        )
    return (
        f'<figure class="overlay" data-image-id="{_h(panel.image_id)}">'
        f'<img src="data:image/png;base64,{data}" width="{width * scale}" '
        f'height="{height * scale}" alt="{_h(panel.parts)}: {_h(panel.image_id)}">'
        f"<figcaption>{caption}<br>{_h(panel.parts)}</figcaption></figure>"
    )


def _images_html(results: Results, s: RunSummary, n: int, alpha: float) -> str:
    if not results.sample_ids(s.run_id, 1):
        return ""
    legend = _legend_html(s.class_names)
    best, worst = results.best_and_worst(s.run_id, n)
    if not best:
        ids = results.sample_ids(s.run_id, n)
        figures = "".join(
            _figure_html(p, None) for p in panels(results, s.run_id, ids, alpha=alpha)
        )
        return (
            f'<section id="sample-images"><h2>Images</h2><p class="note">No per-image scores '
            f"(no image had a mask): the first {len(ids)} by id.</p>{legend}"
            f'<div class="overlays">{figures}</div></section>'
        )
    sections = []
    for key, title, ranked in (("best", "Best", best), ("worst", "Worst", worst)):
        if not ranked:
            continue
        shown = panels(results, s.run_id, [i.image_id for i in ranked], alpha=alpha)
        figures = "".join(_figure_html(p, i) for p, i in zip(shown, ranked, strict=True))
        sections.append(
            f'<section id="{key}-images"><h2>{title} {len(ranked)} images by mean IoU</h2>'
            f'{legend}<div class="overlays">{figures}</div></section>'
        )
    return "".join(sections)


def _errors_html(errors: pa.Table, total: int) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{_h(r[k] if r[k] is not None else '-')}</td>" for k in r) + "</tr>"
        for r in errors.to_pylist()
    )
    head = "".join(f"<th>{_h(n)}</th>" for n in errors.column_names)
    more = (
        f'<p class="note">{errors.num_rows} of {total} shown; the errors table has all.</p>'
        if total > errors.num_rows
        else ""
    )
    return (
        f'<section id="errors"><h2>Errors ({total})</h2><table><tr>{head}</tr>{rows}</table>'
        f"{more}</section>"
    )
