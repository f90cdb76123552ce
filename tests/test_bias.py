"""Bias measurement: the HEIM / DALL-Eval formulas against hand-computed cases, the probes on the real tiny CLIP,
the set-level report (no person is never a zero) and `genpipe report bias`."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json

import numpy as np
import pytest

from pipeline.audit import AuditStore
from pipeline.report.bias import compute_bias_report, render_markdown, template_of, write_bias_report
from pipeline.report.cli import register
from pipeline.scoring.bias import (
    ATTRIBUTES,
    BiasScorer,
    gender_imbalance,
    mean_absolute_deviation,
    score_keys,
    skin_tone_imbalance,
)
from pipeline.scoring.clip import ClipEmbedder
from pipeline.storage import Storage
from schemas.record import Item
from schemas.spec import BiasSpec, ClipSpec


@pytest.mark.parametrize(("p", "expected"), [(0.5, 0.0), (0.7, 0.2), (0.3, 0.2), (1.0, 0.5), (0.0, 0.5)])
def test_heim_gender_imbalance(p, expected):
    assert gender_imbalance(p) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("dist", "expected"),
    [
        ([0.1] * 10, 0.0),
        ([0, 0, 1, 0, 0, 0, 0, 0, 0, 0], 0.18),  # (0.9 + 9 x 0.1) / 10
        ([0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0, 0], 0.04),  # (0.1 + 0.1 + 0.1 + 0.1) / 10
        ([0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0], 0.16),  # (0.4 + 0.4 + 8 x 0.1) / 10
    ],
)
def test_heim_skin_tone_imbalance(dist, expected):
    assert skin_tone_imbalance(dist) == pytest.approx(expected)
    assert mean_absolute_deviation(dist) == pytest.approx(expected)  # DALL-Eval MAD is the same for K = 10


@pytest.mark.parametrize(
    ("dist", "expected"),
    [([0.25] * 4, 0.0), ([0.5, 0.25, 0.25, 0.0], 0.125), ([1, 0, 0, 0], 0.375), ([0.7, 0.3], 0.2)],
)
def test_dall_eval_mean_absolute_deviation(dist, expected):
    assert mean_absolute_deviation(dist) == pytest.approx(expected)


def test_skin_tone_needs_ten_values():
    with pytest.raises(ValueError, match="10 values"):
        skin_tone_imbalance([0.5, 0.5])


# --- probes on the real tiny CLIP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    return ClipEmbedder(ClipSpec()).load()


@pytest.mark.parametrize(("threshold", "present"), [(0.0, True), (1.0, False)])
def test_probes_give_distributions_or_an_explicit_no_person(embedder, threshold, present):
    bias = BiasScorer(["person", "gender", "skin_tone", "age"], person_threshold=threshold).load(embedder)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    rows = bias.score(embedder.embed_images(images))
    for row in rows:
        assert set(row) == set(score_keys(["gender", "skin_tone", "age"]))
        assert 0.0 < row["bias_person"] < 1.0 and row["bias_person_present"] is present
        for attr in ATTRIBUTES.values():
            values = [row[f"{attr.key}_{c}"] for c in attr.classes]
            if present:
                assert sum(values) == pytest.approx(1.0) and all(0.0 <= v <= 1.0 for v in values)
            else:
                assert values == [None] * len(values)  # explicit: no person, not a zero
    assert bias.version.startswith("bias-probes-v1 on genpipe-tiny-clip/tiny-v1@sha256:")


# --- the set-level report -----------------------------------------------------------------------------------------

_n = iter(range(10_000))


def _rec(prompt_id: str, campaign: str | None, female: float | None, *, unscored: bool = False, **kw) -> Item:
    n = next(_n)
    it = Item(item_id=f"{n:032x}", job="job-b", prompt_id=prompt_id, sample_index=0, row_number=n, prompt="x",
              campaign=campaign, status="generated", decision="pass", **kw)  # fmt: skip
    if unscored:
        return it
    present = female is not None
    it.scores = {"bias_person": 0.9 if present else 0.1, "bias_person_present": present}
    for name, attr in ATTRIBUTES.items():
        k = len(attr.classes)
        if not present:
            it.scores.update({f"{attr.key}_{c}": None for c in attr.classes})
        elif name == "gender":
            it.scores.update(bias_gender_female=female, bias_gender_male=1 - female)
        else:  # skin tone: all on the first class; age: uniform
            dist = [1.0] + [0.0] * (k - 1) if name == "skin_tone" else [1 / k] * k
            it.scores.update({f"{attr.key}_{c}": v for c, v in zip(attr.classes, dist, strict=True)})
    return it


def _records() -> list[Item]:
    return [
        _rec("hero-01", "spring", 0.8),
        _rec("hero-02", "spring", 0.6),
        _rec("hero-03", "spring", None),  # no person: must not pull P(female) towards 0
        _rec("hero-04", "spring", None),
        _rec("pack-01", "catalogue", 0.5),
        _rec("pack-02", "catalogue", 0.5),
        _rec("pack-03", "catalogue", None, unscored=True),  # bias probes failed: counted as unscored
        _rec("x-1", None, 0.5),
    ]


def test_report_groups_no_person_and_unscored_and_hand_computed_metrics():
    recs = _records()
    recs.append(Item(item_id="f" * 32, job="job-b", prompt_id="hero-05", sample_index=0, row_number=99, prompt="x",
                     campaign="spring", status="rejected"))  # fmt: skip
    report = compute_bias_report(
        recs, "job-b", BiasSpec(min_group_size=2, flag_thresholds={"gender": 0.2, "skin_tone": 0.05})
    )
    groups = {(g["level"], g["name"]): g for g in report["groups"]}
    job = groups[("job", "job-b")]
    assert (job["images"], job["person"], job["no_person"], job["unscored"]) == (8, 5, 2, 1)
    spring = groups[("campaign", "spring")]
    assert (spring["person"], spring["no_person"]) == (2, 2)
    g = spring["attributes"]["gender"]
    assert g["distribution"] == {"female": pytest.approx(0.7), "male": pytest.approx(0.3)}  # (0.8 + 0.6) / 2
    assert g["heim_gender_imbalance"] == pytest.approx(0.2) and g["mad"] == pytest.approx(0.2)
    assert g["flagged"] and g["status"] == "flagged" and g["argmax_counts"] == {"female": 2, "male": 0}
    assert groups[("campaign", "catalogue")]["attributes"]["gender"]["mad"] == pytest.approx(0.0)
    skin = job["attributes"]["skin_tone"]
    assert skin["heim_skin_tone_imbalance"] == pytest.approx(0.18) and skin["flagged"]
    assert job["attributes"]["age"]["mad"] == pytest.approx(0.0) and not job["attributes"]["age"]["flagged"]
    assert groups[("campaign", None)]["attributes"]["gender"]["status"] == "insufficient"  # 1 < min size 2
    assert ("template", "hero") in groups and ("template", "pack") in groups
    flags = {(f["level"], f["name"], f["attribute"]) for f in report["flags"]}
    assert ("campaign", "spring", "gender") in flags and ("campaign", "catalogue", "gender") not in flags


def test_a_group_with_only_no_person_images_reports_no_distribution():
    report = compute_bias_report([_rec("a-1", "c", None), _rec("a-2", "c", None)], "job-b")
    g = next(g for g in report["groups"] if g["level"] == "campaign")
    assert g["attributes"]["gender"] == {"classes": ["female", "male"], "images": 0, "threshold": 0.2,
                                         "status": "no_person_images", "distribution": None, "mad": None,
                                         "flagged": False}  # fmt: skip


def test_template_comes_from_metadata_or_the_prompt_id():
    assert template_of(_rec("spring-hero-01", None, 0.5)) == "spring-hero"
    assert template_of(_rec("cat-sku-1001", None, 0.5)) == "cat-sku"
    assert template_of(_rec("x", None, 0.5, metadata={"template": "t-42"})) == "t-42"


def test_write_bias_report_writes_markdown_json_and_a_plot_per_attribute(tmp_path):
    urls = write_bias_report(_records(), Storage(str(tmp_path)), "job-b", BiasSpec(min_group_size=2))
    assert sorted(urls) == ["bias.json", "bias.md", "bias_age.png", "bias_gender.png", "bias_person.png",
                            "bias_skin_tone.png"]  # fmt: skip
    for name in urls:
        data = (tmp_path / "reports" / "bias" / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000
    md = (tmp_path / "reports" / "bias" / "bias.md").read_text()
    assert "## Per campaign" in md and "`spring`" in md and "gender mad 0.200" in md
    assert json.loads((tmp_path / "reports" / "bias" / "bias.json").read_text())["job"] == "job-b"


def test_report_bias_cli(tmp_path):
    db = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(db)
    store.begin_run("job-b", {"output": str(tmp_path / "out"), "scoring": {"bias": {"min_group_size": 1}}}, {}, {})
    store.write_items(_records(), None)
    store.dispose()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "bias", "--db", db, "--job", "job-b"])
    assert args.fn(args) == 0
    report = json.loads((tmp_path / "out" / "job-b" / "reports" / "bias" / "bias.json").read_text())
    assert report["config"]["min_group_size"] == 1
    args = parser.parse_args(["report", "bias", "--db", db, "--job", "job-b", "--out", str(tmp_path / "elsewhere")])
    assert args.fn(args) == 0 and (tmp_path / "elsewhere" / "bias_gender.png").exists()


def test_report_bias_cli_never_creates_a_database_nor_guesses_a_relative_output(tmp_path, monkeypatch):
    from pipeline.errors import GenpipeError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    typo = tmp_path / "typo.db"
    args = parser.parse_args(["report", "bias", "--db", f"sqlite:///{typo}", "--job", "x"])
    with pytest.raises(GenpipeError):
        args.fn(args)
    assert not typo.exists()  # a mistyped path is an error, not a new empty audit DB
    db = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(db)
    store.begin_run("job-r", {"output": "runs/demo", "scoring": {"bias": {"min_group_size": 1}}}, {}, {})
    store.write_items([dataclasses.replace(r, job="job-r") for r in _records()], None)
    store.dispose()
    elsewhere, ran_in = tmp_path / "elsewhere", tmp_path / "project"
    elsewhere.mkdir()
    (ran_in / "runs" / "demo" / "job-r").mkdir(parents=True)
    args = parser.parse_args(["report", "bias", "--db", db, "--job", "job-r"])
    monkeypatch.chdir(elsewhere)
    with pytest.raises(GenpipeError, match="is relative to the directory it ran in"):
        args.fn(args)
    assert not any(elsewhere.iterdir())
    monkeypatch.chdir(ran_in)  # from where the job ran, its relative output is found
    assert args.fn(args) == 0 and (ran_in / "runs" / "demo" / "job-r" / "reports" / "bias" / "bias.md").exists()


def test_a_campaign_name_cannot_break_the_markdown_table():
    from pipeline.report.bias import render_markdown

    records = [dataclasses.replace(r, campaign="spring | sale `x`\nnew") for r in _records()]
    text = render_markdown(compute_bias_report(records, "job-b", BiasSpec(min_group_size=1)))
    lines = text.splitlines()
    assert "- **campaign `spring \\| sale 'x' new`**: skin_tone mad 0.180 >= 0.05" in lines  # one line
    header = next(line for line in lines if line.startswith("| group |"))
    row = next(line for line in lines if line.startswith("| `spring"))
    assert row.startswith("| `spring \\| sale 'x' new` |")
    assert row.replace("\\|", "").count("|") == header.count("|")  # as many cells as the header


def _runs(row: list[tuple[int, int, int]], colour: tuple[int, int, int]) -> int:
    """The longest run of ``colour`` in one row of pixels."""
    best = cur = 0
    for px in row:
        cur = cur + 1 if px == colour else 0
        best = max(best, cur)
    return best


def test_bias_plot_draws_each_groups_shares_to_scale():
    from PIL import Image, ImageColor

    from pipeline.report.bias import render_plot
    from pipeline.report.charts import TAB10

    def group(name, dist):
        return {"level": "template", "name": name, "person": 4, "no_person": 0, "unscored": 0,
                "attributes": {"gender": {"distribution": dist}}}  # fmt: skip

    report = {"job": "j", "groups": [group("a", {"female": 0.75, "male": 0.25}), group("none", None),
                                     group("b", {"female": 0.2, "male": 0.8})]}  # fmt: skip
    img = Image.open(io.BytesIO(render_plot(report, "gender"))).convert("RGB")
    female, male = ImageColor.getrgb(TAB10[0]), ImageColor.getrgb(TAB10[1])
    rows = [list(img.crop((0, y, img.width, y + 1)).getdata()) for y in range(img.height)]
    bars = [y for y, r in enumerate(rows) if _runs(r, female) > 40 or _runs(r, male) > 40]
    runs: list[list[int]] = []  # the bars: contiguous bands of rows, top to bottom
    for y in bars:
        if runs and y == runs[-1][-1] + 1:
            runs[-1].append(y)
        else:
            runs.append([y])
    assert len(runs) == 2  # the group without person images draws no bar
    ratios = []
    for band in runs:
        mid = rows[band[len(band) // 2]]
        ratios.append((_runs(mid, female) + 2) / (_runs(mid, male) + 2))  # + the 1-px edges of each segment
    assert ratios[0] == pytest.approx(3.0, rel=0.03) and ratios[1] == pytest.approx(0.25, rel=0.03)


def test_bias_plot_shortens_long_names_and_says_how_many_groups_it_leaves_out():
    from pipeline.report.bias import render_plot
    from pipeline.report.charts import font, shorten

    assert shorten("a  b\nc", font(12), 500) == "a b c"
    text = " ".join(["spring"] * 40)
    cut = shorten(text, font(12), 200)
    assert cut.endswith("…") and text.startswith(cut[:-1])
    assert font(12).getlength(cut) <= 200 < font(12).getlength(text[: len(cut)] + "…")  # the longest that fits
    groups = [{"level": "template", "name": f"t-{i}", "person": 1, "no_person": 0, "unscored": 0} for i in range(45)]
    short = render_plot({"job": "j", "groups": groups[:40]}, "person", max_groups=40)
    capped = render_plot({"job": "j", "groups": groups}, "person", max_groups=40)
    from PIL import Image

    assert Image.open(io.BytesIO(capped)).height > Image.open(io.BytesIO(short)).height  # the note's line


def test_no_campaign_is_its_own_group_apart_from_a_campaign_named_none():
    recs = [_rec("a-1", None, 0.9), _rec("a-2", "", 0.9), _rec("a-3", "  ", 0.9), _rec("b-1", "(none)", 0.1)]
    report = compute_bias_report(recs, "job-b", BiasSpec(min_group_size=1))
    campaigns = {g["name"]: g for g in report["groups"] if g["level"] == "campaign"}
    assert set(campaigns) == {None, "(none)"}  # missing and blank are no campaign; "(none)" is a name
    assert campaigns[None]["person"] == 3 and campaigns["(none)"]["person"] == 1
    assert [g["name"] for g in report["groups"] if g["level"] == "campaign"] == ["(none)", None]  # named first
    md = render_markdown(report)
    assert "| _no campaign_ | 3 |" in md and "| `(none)` | 1 |" in md
    assert json.loads(json.dumps(report))["groups"][2]["name"] is None


def test_report_bias_to_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    db = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore(db)
    store.begin_run("job-b", {"output": str(tmp_path / "out")}, {}, {})
    store.write_items(_records(), None)
    store.dispose()
    (tmp_path / "a-file").write_text("in the way")
    assert main(["report", "bias", "--db", db, "--job", "job-b", "--out", str(tmp_path / "a-file" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"genpipe: error: bias report: cannot write to {tmp_path / 'a-file' / 'x'}: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
