"""Shared helpers for the self-contained HTML reports: escaping, tables, PNG data URIs, display planes.

Reports must open offline from a single file, so every image is an inline base64 PNG and the CSS is
inlined; nothing here references another file or the network.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1150px;
padding:0 16px 40px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin:18px 0 4px}h2{border-bottom:2px solid #ccc;padding-bottom:3px;margin-top:30px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:6px 0;z-index:2}
nav a{margin-right:14px;text-decoration:none;color:#1a5fb4}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.caption{color:#555;font-size:.9em;margin:4px 0 10px}
.mosaic{display:flex;flex-wrap:wrap;gap:8px}
figure.lesion{margin:0;border:2px solid #bbb;border-radius:4px;padding:3px;background:#fafafa}
figure.lesion.rimpos{border-color:#c01c28;background:#fff3f3}
figure.lesion img{display:block;height:auto}
figure.lesion figcaption{font-size:.85em;max-width:370px}
.tag{display:inline-block;padding:0 5px;border-radius:3px;font-weight:bold;font-size:.85em}
.tag.rimpos{background:#c01c28;color:#fff}.tag.rimneg{background:#ddd;color:#333}
.msg-error{color:#a51d2d;font-weight:bold}.msg-warning{color:#9c6500}
.ok{color:#26a269;font-weight:bold}.bad{color:#a51d2d;font-weight:bold}
img.figure{max-width:100%;height:auto}
"""


def esc(value: Any) -> str:
    """HTML-escape any value's text; every user- or data-derived string goes through here."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Short human-readable text for table cells: `n/a` for missing, trimmed floats."""
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.{digits}g}" if abs(float(value)) < 1e4 else f"{float(value):.0f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return str(value)


def fixed(value: Any, decimals: int) -> str:
    """Fixed-point text for columns that are compared by eye (probabilities, volumes); `n/a` when missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{number:.{decimals}f}" if math.isfinite(number) else "n/a"


def safe_href(href: str) -> str | None:
    """Accept only relative links (no scheme, no host) so a report never points outside the output folder."""
    parts = urlsplit(str(href))
    if parts.scheme or parts.netloc or str(href).startswith("//"):
        return None
    return str(href)


def kv_table(items: Mapping[str, Any] | Iterable[tuple[str, Any]], empty: str = "none") -> str:
    """Two-column key/value table; an empty mapping gives a short sentence instead of an empty table."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    if not pairs:
        return f'<p class="caption">{esc(empty)}</p>'
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """Table from pre-rendered (already escaped) cell HTML; `numeric` right-aligns columns."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(row, numeric))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    """The whole document: inline CSS, sticky section navigation, no external resources, ASCII only."""
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<nav>{links}</nav><h1>{esc(title)}</h1>{body}</body></html>\n"
    ).encode("ascii", "xmlcharrefreplace").decode("ascii")  # pure ASCII: safe whatever the writer's encoding


def png_data_uri(rgb: np.ndarray) -> str:
    """Encode a uint8 (H, W) or (H, W, 3) array as an optimised PNG data URI (small tiles, exact pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uri(fig: Figure, dpi: int = 80) -> str:
    """Render a matplotlib Figure (Agg canvas, no pyplot global state) to a PNG data URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(uri: str, alt: str, css_class: str = "figure", extra: str = "") -> str:
    """`<img>` for a data URI; only data URIs are accepted so no image can point at a file."""
    if not uri.startswith("data:image/png;base64,"):
        raise ValueError("report images must be embedded PNG data URIs")
    return f'<img class="{esc(css_class)}" src="{uri}" alt="{esc(alt)}"{extra}>'


def window_to_uint8(img: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Linear grey window; NaN (outside the field of view) becomes black."""
    scaled = (np.nan_to_num(img, nan=vmin) - vmin) / max(vmax - vmin, 1e-12)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def robust_window(vol: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Percentile window over non-zero finite voxels (FLAIR has no physical unit, so windows are relative)."""
    values = vol[np.isfinite(vol) & (vol != 0)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1.0)


@dataclass(frozen=True)
class Plane:
    """A display plane of a voxel grid: which voxel axis is cut, and how the other two map to screen.

    Slices stay in the data's own voxel grid (the lesion's k index is the one the model saw) and are only
    flipped/transposed so that the screen follows the radiological convention of the review page
    (review/images.py): every world coordinate decreases left to right and top to bottom, so the patient's
    right is on the screen's left (axial, coronal), anterior on the left (sagittal), anterior/superior at
    the top. `col_labels`/`row_labels` name the screen's left/right and top/bottom edges.
    """

    axis: int
    col_axis: int
    row_axis: int
    flip_cols: bool
    flip_rows: bool
    col_mm: float
    row_mm: float
    col_labels: tuple[str, str]
    row_labels: tuple[str, str]

    @classmethod
    def from_affine(cls, affine: np.ndarray, axis: int) -> "Plane":
        ornt = nib.orientations.io_orientation(affine)
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        in_plane = sorted((a for a in range(3) if a != axis), key=lambda a: ornt[a, 0])
        col, row = in_plane  # lower world axis (x before y before z) runs horizontally
        names = (("L", "R"), ("P", "A"), ("I", "S"))
        return cls(
            axis=axis,
            col_axis=col,
            row_axis=row,
            flip_cols=bool(ornt[col, 1] > 0),
            flip_rows=bool(ornt[row, 1] > 0),
            col_mm=float(zooms[col]),
            row_mm=float(zooms[row]),
            col_labels=names[int(ornt[col, 0])][::-1],
            row_labels=names[int(ornt[row, 0])][::-1],
        )

    def take(self, vol: np.ndarray, index: int) -> np.ndarray:
        """The 2D screen image (rows top->bottom, columns left->right) of slice `index`."""
        sl = np.take(vol, int(index), axis=self.axis)
        rest = [a for a in range(3) if a != self.axis]
        img = sl if rest.index(self.row_axis) == 0 else sl.T
        if self.flip_cols:
            img = img[:, ::-1]
        if self.flip_rows:
            img = img[::-1, :]
        return img

    def to_screen(self, ijk: Sequence[float], shape: Sequence[int]) -> tuple[float, float]:
        """(row, col) of a voxel-space point on the screen image made by `take`."""
        row = float(ijk[self.row_axis])
        col = float(ijk[self.col_axis])
        if self.flip_rows:
            row = shape[self.row_axis] - 1 - row
        if self.flip_cols:
            col = shape[self.col_axis] - 1 - col
        return row, col


def label_edges(rgb: np.ndarray, left: str, right: str, colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Write orientation letters into an RGB image (bottom left and bottom right corners), in place.

    Drawn into the pixels rather than the page, so an image copied out of a report keeps its orientation.
    """
    height, width = rgb.shape[:2]
    size = max(8, min(height, width) // 8)
    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: exact colours, crisp when the page scales the tile up
    font = ImageFont.load_default(size=size)
    for text, at_left in ((left, True), (right, False)):
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=1)  # no anchors: bitmap fonts too
        x = 2 - x0 if at_left else width - 2 - x1
        draw.text((x, height - 2 - y1), text, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    rgb[..., :3] = np.asarray(image)
    return rgb


def new_figure(width_in: float, height_in: float) -> Figure:
    """A pyplot-free Figure, safe to use from nipype worker processes and threads."""
    return Figure(figsize=(width_in, height_in))
