"""Job spec validation and --set overrides: every problem is named by its key path."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import SpecLoader, apply_overrides, load_spec, parse_override
from pipeline.errors import SpecError
from schemas.limits import SAMPLER_NAMES
from schemas.spec import JobSpec

BASE = {"name": "j", "manifest": "m.parquet", "output": "out"}


def _problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(None, base=data)
    return info.value.problems


def test_minimal_spec_gets_defaults_that_run_here():
    spec = load_spec(None, base=BASE)
    assert spec.model.id == "tiny"
    assert spec.sampler.name == "euler" and spec.sampler.steps == 20
    assert spec.resources.gpus_per_actor == 0.0 and 0 < spec.resources.cpus_per_actor < 1
    assert spec.database_url().startswith("sqlite:///") and spec.database_url().endswith("/out/genpipe.db")


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"sampler": {"nme": "euler"}}, "sampler.nme: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"sampler": {"name": "warp_drive"}}, "sampler.name: unknown sampler 'warp_drive'"),
        ({"sampler": {"steps": 0}}, "sampler.steps: Input should be greater than or equal to 1"),
        ({"sampler": {"steps": 201}}, "sampler.steps: Input should be less than or equal to 200"),
        ({"sampler": {"guidance_scale": -1}}, "sampler.guidance_scale: Input should be greater than or equal to 0"),
        ({"image": {"width": 100}}, "image.width: Input should be a multiple of 8"),
        ({"image": {"height": 4096}}, "image.height: Input should be less than or equal to 2048"),
        ({"image": {"format": "gif"}}, "image.format: Input should be 'png', 'jpeg' or 'webp'"),
        ({"model": {"dtype": "int8"}}, "model.dtype: Input should be 'float32', 'float16' or 'bfloat16'"),
        ({"model": {"lora": [{"scale": 1.0}]}}, "model.lora.0.path: Field required"),
        ({"resources": {"generator_actors": 0}}, "resources.generator_actors: Input should be greater than or equal"),
        ({"name": "../etc"}, "name: must be 1-64 characters"),
        ({"executor": "spark"}, "executor: Input should be 'ray' or 'local'"),
        ({"row_overrides": ["prompt"]}, "row_overrides.0: Input should be"),
    ],
)
def test_bad_spec_names_the_key(patch, expected):
    problems = _problems({**BASE, **patch})
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        # YAML types are taken as written: a spec is never "corrected" into something its author did not write.
        ({"sampler": {"steps": True}}, "sampler.steps: Input should be a valid integer"),
        ({"sampler": {"steps": 20.5}}, "sampler.steps: Input should be a valid integer"),
        ({"image": {"width": "64"}}, "image.width: Input should be a valid integer"),
        ({"sampler": {"guidance_scale": "7.5"}}, "sampler.guidance_scale: Input should be a valid number"),
        ({"sampler": {"guidance_scale": False}}, "sampler.guidance_scale: Input should be a valid number"),
        ({"scoring": {"enabled": "no"}}, "scoring.enabled: Input should be a valid boolean"),
        ({"scoring": {"enabled": 0}}, "scoring.enabled: Input should be a valid boolean"),
        ({"model": {"lora": [{"path": "/x", "scale": "1"}]}}, "model.lora.0.scale: Input should be a valid number"),
        ({"name": 2027}, "name: Input should be a valid string"),
        ({"row_overrides": "seed"}, "row_overrides: Input should be a valid tuple"),
    ],
)
def test_values_are_not_coerced_across_types(patch, expected):
    problems = _problems({**BASE, **patch})
    assert any(p.startswith(expected) for p in problems), problems


def test_yaml_lists_and_ints_for_floats_are_accepted(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: j\nmanifest: m.parquet\noutput: out\nsampler: {guidance_scale: 7}\n"
        "scoring: {bias: {attributes: [person, age]}, nsfw: {classifiers: [open_nsfw]}}\n"
        "policy: {regenerate_on: [review]}\nrow_overrides: [seed]\n"
    )
    spec = load_spec(str(path))
    assert spec.sampler.guidance_scale == 7.0 and isinstance(spec.sampler.guidance_scale, float)
    assert spec.scoring.bias.attributes == ("person", "age") and spec.scoring.nsfw.classifiers == ("open_nsfw",)
    assert spec.policy.regenerate_on == ("review",) and spec.row_overrides == ("seed",)
    assert JobSpec.model_validate(spec.model_dump()) == spec  # a dumped spec validates back to itself


def test_unknown_sampler_lists_valid_names():
    problems = _problems({**BASE, "sampler": {"name": "nope"}})
    for name in SAMPLER_NAMES:
        assert name in problems[0]


def test_every_problem_is_reported_at_once():
    problems = _problems({**BASE, "sampler": {"steps": 0, "name": "x"}, "image": {"width": 3}})
    keys = {p.split(":")[0] for p in problems}
    assert {"sampler.steps", "sampler.name", "image.width"} <= keys


def test_missing_required_keys():
    problems = _problems({"name": "j"})
    assert "manifest: Field required" in problems and "output: Field required" in problems


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: j\nmanifest: m.parquet\noutput: out\n")
    spec = load_spec(str(path), ["resources.batch_size=8", "sampler.name=ddim", "image.format=jpeg",
                                 "model.lora=[{path: /x, scale: 0.5}]"])  # fmt: skip
    assert spec.resources.batch_size == 8 and spec.sampler.name == "ddim" and spec.image.format == "jpeg"
    assert spec.model.lora[0].scale == 0.5
    with pytest.raises(SpecError) as info:
        load_spec(str(path), ["resources.batch_size=zero"])
    assert info.value.problems[0].startswith("resources.batch_size:")
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(str(path), ["resources.batch_size"])
    with pytest.raises(SpecError, match="name is not a mapping"):
        apply_overrides({"name": "j"}, ["name.x=1"])


def test_floats_without_a_dot_are_numbers_as_in_yaml_1_2(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string, which the strict types would refuse; specs read it as a float.
    path = tmp_path / "s.yaml"
    path.write_text("name: j\nmanifest: m.parquet\noutput: out\nsampler: {guidance_scale: 75e-1}\n")
    assert load_spec(str(path)).sampler.guidance_scale == 7.5
    assert load_spec(str(path), ["sampler.guidance_scale=5E+0"]).sampler.guidance_scale == 5.0
    assert parse_override("a=1e-4") == (["a"], 1e-4) and parse_override("a='1e-4'") == (["a"], "1e-4")


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    # PyYAML keeps the last of two equal keys silently: `steps: 20` then `steps: 30` ran with 30.
    path = tmp_path / "s.yaml"
    path.write_text("name: j\nmanifest: m.parquet\noutput: out\nsampler:\n  steps: 20\n  steps: 30\n")
    with pytest.raises(SpecError, match=r"found the key 'steps' twice \(first at line 5\).*line 6"):
        load_spec(str(path))
    # A merge key's values may be overridden: that is what it is for.
    merged = yaml.load("base: &b {steps: 20, seed: 1}\nsampler:\n  <<: *b\n  steps: 30\n", Loader=SpecLoader)  # noqa: S506
    assert merged["sampler"] == {"steps": 30, "seed": 1}


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=8") == (["a", "b"], 8)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=0.25") == (["a"], 0.25)
    assert parse_override("a=x=y") == (["a"], "x=y")


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(str(listy))
    manifest = tmp_path / "m.parquet"  # a common slip: the manifest given as the spec
    manifest.write_bytes(b"PAR1\x15\x04\x15\xff\xfe\x00PAR1")
    with pytest.raises(SpecError, match="not a text file"):
        load_spec(str(manifest))
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(str(tmp_path))
    with pytest.raises(SpecError, match="cannot read: ValueError: Protocol not known"):
        load_spec("nosuchproto://bucket/spec.yaml")
    assert _problems({**BASE, "name": "job\n"}) == [  # "$" would match before a final newline
        "name: must be 1-64 characters of [A-Za-z0-9._-] and not '.' or '..'"
    ]


def test_database_required_for_remote_output():
    spec = JobSpec.model_validate({**BASE, "output": "s3://bucket/prefix"})
    with pytest.raises(ValueError, match="database: required"):
        spec.database_url()
