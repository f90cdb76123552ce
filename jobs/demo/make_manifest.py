"""Writes the demo manifest (``jobs/demo/manifest.parquet``) from the rows below.

Three campaigns of realistic e-commerce / marketing prompts, with seeds, a few per-row overrides, pass-through
columns (``brief_owner``), one prompt the safety screen must block, and four deliberately bad rows that the run
must reject with reasons.
Run: ``python -m jobs.demo.make_manifest`` (the committed Parquet file is its output).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

SPRING = [
    ("spring-hero-01", "a pastel linen summer dress on a wooden hanger, soft morning light, studio product shot"),
    ("spring-hero-02", "white leather sneakers on a mint green pedestal, minimal studio background, soft shadows"),
    ("spring-hero-03", "a straw sun hat and round sunglasses on a beige table, top-down flat lay"),
    ("spring-hero-04", "a ceramic vase with fresh tulips beside a window, lifestyle photo, warm tones"),
    ("spring-banner-01", "wide web banner of a blooming cherry orchard with empty space on the left for text"),
    ("spring-banner-02", "picnic blanket with a wicker basket, lemonade and strawberries in a sunny park"),
    ("spring-social-01", "square social media post of a cotton tote bag with embroidered flowers, pastel colours"),
    ("spring-social-02", "a bicycle with a front basket full of daffodils leaning against a yellow wall"),
    ("spring-email-01", "email header image of rain boots and a clear umbrella on a spring street"),
    ("spring-email-02", "a gardening set with gloves, trowel and seed packets on a potting bench"),
]
CATALOGUE = [
    ("cat-sku-1001", "stainless steel insulated water bottle, 750 ml, matte black, on pure white background"),
    ("cat-sku-1002", "over-ear wireless headphones in silver, three-quarter view, white seamless background"),
    ("cat-sku-1003", "a set of four stoneware coffee mugs in earthy glazes, packshot on white"),
    ("cat-sku-1004", "a leather weekend duffel bag in cognac brown, front view, studio lighting"),
    ("cat-sku-1005", "a minimalist analog wrist watch with a navy dial and steel mesh strap, macro product shot"),
    ("cat-sku-1006", "a cast iron skillet with a wooden handle, top view, neutral grey background"),
    ("cat-sku-1007", "a folded merino wool scarf in charcoal, knitted texture detail, soft light"),
    ("cat-sku-1008", "a compact espresso machine in brushed aluminium on a kitchen counter"),
]
HOLIDAY = [
    ("holiday-teaser-01", "a gift box wrapped in red paper with a gold ribbon, bokeh of fairy lights behind it"),
    ("holiday-teaser-02", "a cosy living room with a decorated tree and knitted stockings by the fireplace"),
    ("holiday-teaser-03", "snowy storefront window display with glowing lanterns, evening, festive atmosphere"),
    ("holiday-teaser-04", "a flat lay of wrapping paper, twine, pine cones and scissors on a white table"),
    ("holiday-teaser-05", "hot chocolate with marshmallows in a ceramic mug on a wool blanket, close up"),
    ("holiday-teaser-06", "a family board game night on a wooden table, warm lamp light, top-down view"),
]


def rows() -> list[dict]:
    out: list[dict] = []
    for i, (pid, prompt) in enumerate(SPRING):
        out.append({"prompt_id": pid, "prompt": prompt, "campaign": "spring-2027", "locale": "en-GB",
                    "seed": 1000 + i, "tags": ["spring", "lifestyle" if "hero" not in pid else "hero"],
                    "brief_owner": "marketing-emea"})  # fmt: skip
    for i, (pid, prompt) in enumerate(CATALOGUE):
        out.append({"prompt_id": pid, "prompt": prompt, "campaign": "catalogue-refresh", "locale": "en-US",
                    "sku": pid.removeprefix("cat-sku-"), "negative_prompt": "text, watermark, logo, blurry",
                    "tags": ["packshot"], "brief_owner": "ecommerce-us"})  # fmt: skip
        if i < 4:
            out[-1]["seed"] = 2000 + i
    for pid, prompt in HOLIDAY:
        out.append({"prompt_id": pid, "prompt": prompt, "campaign": "holiday-teaser", "locale": "de-DE",
                    "tags": ["holiday"], "brief_owner": "brand"})  # fmt: skip
    # Per-row overrides of the spec.
    by_id = {r["prompt_id"]: r for r in out}
    by_id["spring-banner-01"].update(width=96, height=48)  # a wide banner
    by_id["spring-hero-01"].update(num_images=2)  # two variations for the hero
    by_id["cat-sku-1005"].update(steps=30, guidance_scale=9.0)  # a detailed macro shot
    by_id["holiday-teaser-02"].update(sampler="dpmpp_2m", steps=15)
    by_id["holiday-teaser-05"].update(sampler="euler_ancestral", num_images=2)
    # A prompt the screen blocks (obfuscated blocklist term): a `blocked` record naming the rule, never generated.
    out.append({"prompt_id": "spring-social-03", "prompt": "an N.S.F.W swimwear teaser for the summer sale",
                "campaign": "spring-2027", "tags": ["spring"]})  # fmt: skip
    # Deliberately bad rows: each must become a `rejected` record with its reason, and the job must go on.
    out.append({"prompt_id": "../../etc/passwd", "prompt": "a path traversal attempt as a prompt id",
                "campaign": "holiday-teaser"})  # fmt: skip
    out.append({"prompt_id": "cat-sku-1009", "prompt": "   ", "campaign": "catalogue-refresh"})
    out.append({"prompt_id": "spring-hero-02", "prompt": "a duplicate prompt id with a different prompt",
                "campaign": "spring-2027"})  # fmt: skip
    out.append({"prompt_id": "cat-sku-1010", "prompt": "a phone case in a size the model cannot make",
                "campaign": "catalogue-refresh", "width": 100, "steps": 0})  # fmt: skip
    return out


SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("seed", pa.int64()), ("num_images", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("steps", pa.int64()), ("guidance_scale", pa.float64()), ("sampler", pa.string()),
    ("campaign", pa.string()), ("sku", pa.string()), ("locale", pa.string()), ("tags", pa.list_(pa.string())),
    ("brief_owner", pa.string()),
])  # fmt: skip


def main(path: str = os.path.join(os.path.dirname(__file__), "manifest.parquet")) -> str:
    table = pa.Table.from_pylist(rows(), schema=SCHEMA)
    pq.write_table(table, path)
    return path


if __name__ == "__main__":
    print(main())
