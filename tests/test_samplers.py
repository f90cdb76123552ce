"""The sampler table: in step with the documented names, each sampler runs, families are enforced."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.samplers import SAMPLERS, check_sampler, make_scheduler, model_family, samplers_for
from schemas.limits import SAMPLER_NAMES
from tests import fixtures_models as fm
from tests.fixtures_models import make_generator, make_item

tiny_models = fm.tiny_models  # the shared session fixture

UNET_SAMPLERS = [name for name in SAMPLER_NAMES if name != "flow_match_euler"]


@pytest.fixture(scope="module")
def generator(tiny_models):
    return make_generator(batch_size=2)


def test_table_names_are_the_documented_names():
    assert tuple(SAMPLERS) == SAMPLER_NAMES
    assert samplers_for("flow") == ["flow_match_euler"]
    assert samplers_for("unet") == UNET_SAMPLERS


@pytest.mark.parametrize("name", UNET_SAMPLERS)
def test_unet_sampler_constructs_and_generates(name, generator):
    base = generator._base_scheduler_config
    scheduler = make_scheduler(name, base)
    assert type(scheduler).__name__ == SAMPLERS[name].scheduler
    for key, value in SAMPLERS[name].extra.items():
        assert scheduler.config[key] == value
    # The model's training settings carry over from its scheduler config.
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012

    item = make_item(sampler=name, steps=3, seed=7)
    [out] = generator.process([item])
    assert out.status == "pending" and out.error is None, out.error
    assert out.pixels.shape == (32, 32, 3) and out.pixels.dtype == np.uint8
    assert len(np.unique(out.pixels)) > 1
    assert type(generator._pipe.scheduler).__name__ == SAMPLERS[name].scheduler


def test_samplers_differ_from_each_other(generator):
    a, b = generator.process([make_item(sampler="ddim", seed=3), make_item(sampler="euler_ancestral", seed=3)])
    assert not np.array_equal(a.pixels, b.pixels)


def test_flow_match_euler_constructs_from_a_flow_config():
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    scheduler = make_scheduler("flow_match_euler", base)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.shift == 3.0


def test_family_checks_name_the_valid_samplers():
    with pytest.raises(ValueError, match="valid for unet: ddim, ddpm, .*unipc, lcm$"):
        check_sampler("flow_match_euler", "unet")
    for name in UNET_SAMPLERS:
        with pytest.raises(ValueError, match=f"sampler '{name}' does not fit 'flow'.*valid for flow: flow_match_euler"):
            check_sampler(name, "flow")
        check_sampler(name, "unet")
        check_sampler(name, None)
    check_sampler("flow_match_euler", "flow")
    with pytest.raises(ValueError, match="unknown sampler 'k_euler'; valid names: ddim, "):
        check_sampler("k_euler", None)


def test_model_family(tiny_models, tmp_path):
    assert model_family(tiny_models["sd"]) == "unet"
    cases = {
        "FluxPipeline": "flow",
        "StableDiffusion3Pipeline": "flow",
        "SanaPipeline": "flow",
        "StableDiffusionXLPipeline": "unet",
        "KandinskyV22Pipeline": "unet",
        "SomethingNewPipeline": None,
    }
    for class_name, family in cases.items():
        d = tmp_path / class_name
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert model_family(d) == family, class_name
    # An unfamiliar pipeline class still tells its family through its scheduler.
    d = tmp_path / "custom"
    d.mkdir()
    (d / "model_index.json").write_text(
        json.dumps({"_class_name": "MyPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    )
    assert model_family(d) == "flow"
    assert model_family(tmp_path / "missing") is None
    assert model_family("some-org/not-in-the-cache") is None


def test_the_sampler_name_alone_picks_the_algorithm_and_the_model_keeps_its_training_settings():
    # A fine-tune shipped with DPM++ 2M SDE Karras: from_config alone would carry those choices into every sampler.
    shipped = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True, "solver_order": 3,
               "algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction",
               "timestep_spacing": "trailing", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012, "num_train_timesteps": 1000, "rescale_betas_zero_snr": True}  # fmt: skip
    plain = make_scheduler("dpmpp_2m", shipped).config
    assert (plain.use_karras_sigmas, plain.algorithm_type, plain.solver_order, plain.final_sigmas_type) == (
        False, "dpmsolver++", 2, "zero")  # fmt: skip
    karras = make_scheduler("dpmpp_2m_karras", shipped).config
    assert (karras.use_karras_sigmas, karras.algorithm_type) == (True, "dpmsolver++")
    assert make_scheduler("dpmpp_2m_sde", shipped).config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler("euler", shipped).config.use_karras_sigmas is False
    for name in ("dpmpp_2m", "euler", "ddim", "unipc"):
        cfg = make_scheduler(name, shipped).config
        assert (cfg.prediction_type, cfg.timestep_spacing, cfg.beta_end, cfg.rescale_betas_zero_snr) == (
            "v_prediction", "trailing", 0.012, True), name  # fmt: skip
