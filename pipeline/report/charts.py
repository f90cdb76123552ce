"""Horizontal stacked-bar charts as PNG, drawn with Pillow.

The bias report draws one chart per attribute at the end of every scored run. With matplotlib that cost ~0.3 s of
drawing plus a 0.5–1 s import per process, all of it CPU taken from generation on a small machine; a chart of
bars, ticks and text needs none of its machinery. Drawing here takes a few milliseconds.

Text uses DejaVu Sans when matplotlib's copy of it is installed (found without importing matplotlib; it covers
Latin, Greek and Cyrillic), else Pillow's built-in font.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

#: matplotlib's tab10: the colours the report used before, in the same order.
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
WIDTH = 1000
PAD = 14
ROW = 26  # pixels per group
BAR = 18  # bar thickness inside a row
LABEL_MAX = 320  # widest group label before it is shortened with "…"
EDGE = "#999999"
GRID = "#e6e6e6"
INK = "#222222"
MUTED = "#777777"


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    spec = importlib.util.find_spec("matplotlib")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
        if os.path.exists(path):
            with contextlib.suppress(OSError):  # a Pillow built without FreeType
                return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: its small bitmap font


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: str, fnt, anchor: str) -> None:
    """``text`` placed by a two-letter anchor (l/m/r, t/m), computed from its box: bitmap fonts take no anchor."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    x = xy[0] - {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    y = xy[1] - {"t": top, "m": (top + bottom) / 2}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=fnt)


def shorten(text: str, fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """``text`` on one line, cut with "…" to fit ``width`` pixels."""
    text = " ".join(text.split())
    if fnt.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if fnt.getlength(text[:mid] + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def stacked_bars_png(
    title: str,
    labels: Sequence[str],
    shares: Sequence[Sequence[float] | None],
    classes: Sequence[str],
    colours: Sequence[str],
    *,
    xlabel: str,
    legend_title: str | None = None,
    empty_label: str = "no data",
    note: str | None = None,
) -> bytes:
    """One PNG: a bar per label, its shares (each row sums to at most 1) stacked left to right in class order.
    A row of ``None`` draws ``empty_label`` in its place; ``note`` is a line under the axis."""
    if len(labels) != len(shares):
        raise ValueError(f"{len(labels)} labels for {len(shares)} rows of shares")
    if len(colours) < len(classes):
        raise ValueError(f"{len(colours)} colours for {len(classes)} classes")
    small, text, big = font(11), font(12), font(14)
    labels = [shorten(s, text, LABEL_MAX) for s in labels]
    label_w = max((text.getlength(s) for s in labels), default=0.0)
    legend_w = max([text.getlength(c) for c in classes] + [small.getlength(legend_title or "")]) + 22
    x0 = int(PAD + label_w + 10)
    x1 = int(WIDTH - PAD - legend_w - 16)
    top = PAD + 28
    n = max(len(labels), 1)
    bottom = top + n * ROW
    height = bottom + 48 + (18 if note else 0) + PAD
    height = max(height, top + (len(classes) + 1) * 18 + PAD)  # the legend always fits

    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    _text(draw, ((x0 + x1) // 2, PAD), title, INK, big, "mt")
    span = x1 - x0
    for k in range(6):  # ticks and grid at 0, 0.2, …, 1
        x = x0 + round(span * k / 5)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        _text(draw, (x, bottom + 6), f"{k / 5:.1f}", INK, small, "mt")
    _text(draw, ((x0 + x1) // 2, bottom + 24), xlabel, INK, text, "mt")
    if note:
        _text(draw, ((x0 + x1) // 2, bottom + 44), note, MUTED, small, "mt")

    for i, (label, row) in enumerate(zip(labels, shares, strict=True)):
        mid = top + i * ROW + ROW // 2
        _text(draw, (x0 - 8, mid), label, INK, text, "rm")
        if row is None:
            _text(draw, (x0 + 6, mid), empty_label, MUTED, small, "lm")
            continue
        left = 0.0
        for j, share in enumerate(row):
            a, b = x0 + round(span * left), x0 + round(span * min(left + share, 1.0))
            left += share
            if b > a:
                draw.rectangle([(a, mid - BAR // 2), (b, mid + BAR // 2)], fill=colours[j], outline=EDGE)
    draw.rectangle([(x0, top), (x1, bottom)], outline=INK)  # the axes frame, over the bars' edges

    lx, ly = x1 + 16, top
    if legend_title:
        _text(draw, (lx, ly), legend_title, INK, small, "lt")
        ly += 18
    for c, colour in zip(classes, colours):  # noqa: B905 (a palette may hold more colours)
        draw.rectangle([(lx, ly + 1), (lx + 12, ly + 13)], fill=colour, outline=EDGE)
        _text(draw, (lx + 18, ly + 7), c, INK, text, "lm")
        ly += 18

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
