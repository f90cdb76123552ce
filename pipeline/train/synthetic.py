"""A captioned dataset genpipe draws itself: coloured shapes on plain backgrounds ("a red circle on a white
background"). Small, deterministic for a seed, and learnable — what the training tests and the bundled example
train on, since no real dataset may be downloaded.
"""

from __future__ import annotations

import io
import random

import pyarrow as pa

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
#: The Parquet columns, as ``DatasetSpec``'s defaults read them.
SCHEMA = pa.schema([("image", pa.binary()), ("caption", pa.string())])


def draw_shape(shape: str, colour: str, background: str, size: int, rng: random.Random) -> bytes:
    """One PNG: a shape of 40-70 % of the side, at a jittered position."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    side = int(size * rng.uniform(0.4, 0.7))
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def shapes(count: int = 64, size: int = 64, seed: int = 0) -> list[tuple[bytes, str]]:
    """``count`` (PNG bytes, caption) pairs. Shape, colour and background cycle so every combination appears
    once ``count`` reaches 54; position and scale are drawn from ``seed``."""
    rng = random.Random(seed)
    combos = [(s, c, b) for b in BACKGROUNDS for c in COLOURS for s in SHAPES if COLOURS[c] != BACKGROUNDS[b]]
    rng.shuffle(combos)
    out = []
    for i in range(count):
        shape, colour, background = combos[i % len(combos)]
        article = "an" if colour[0] in "aeiou" else "a"
        caption = f"{article} {colour} {shape} on a {background} background"
        out.append((draw_shape(shape, colour, background, size, rng), caption))
    return out


def shapes_table(count: int = 64, size: int = 64, seed: int = 0) -> pa.Table:
    """The shapes as a table with ``image`` (PNG bytes) and ``caption`` columns."""
    pairs = shapes(count, size, seed)
    return pa.Table.from_pydict({"image": [p for p, _ in pairs], "caption": [c for _, c in pairs]}, schema=SCHEMA)
