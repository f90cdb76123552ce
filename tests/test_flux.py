"""A FLUX-shaped pipeline (flow family, 2×2 packed latents, T5 + CLIP text encoders) built tiny offline: what genpipe
lets a manifest row ask of it. FluxPipeline rounds sizes down to multiples of 16 with only a log line, and takes a
negative prompt that it ignores without true CFG; both were accepted and recorded as if they had been honoured."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.samplers import model_traits
from schemas.spec import ModelSpec
from tests.fixtures_models import make_generator, make_item, pixels_of

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    from pipeline.models.tiny import clip_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))  # fmt: skip
    words = ["a", "red", "ceramic", "mug", "on", "wooden", "table", "blurry", "watermark"]
    t5_tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words],
                               extra_ids=0, model_max_length=64)  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                        norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)  # fmt: skip
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)  # fmt: skip
    out = tmp_path_factory.mktemp("flux") / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return str(out)


def test_flux_sizes_must_be_multiples_of_16_and_negative_prompts_are_refused(tiny_flux):
    traits = model_traits(tiny_flux, "flow")
    assert (traits.pipeline, traits.size_multiple) == ("FluxPipeline", 16)
    assert traits.row_problems("flow_match_euler", 32, 64, None) == []
    assert traits.row_problems("flow_match_euler", 40, 64, "blurry") == [
        "width: 40 is not a multiple of 16, which FluxPipeline needs (it would make 32 pixels)",
        "negative_prompt: FluxPipeline ignores it (it needs true CFG, which genpipe does not run); leave it empty",
    ]
    assert traits.row_problems("euler", 32, 32, None)[0].startswith("sampler: sampler 'euler' does not fit 'flow'")


def test_a_size_the_pipeline_rounds_fails_the_item_instead_of_recording_the_wrong_size(tiny_flux):
    generator = make_generator(ModelSpec(id=tiny_flux), batch_size=1)
    setting = {"model": tiny_flux, "sampler": "flow_match_euler", "steps": 2, "guidance_scale": 3.5}
    ok, rounded = generator.process([make_item("a red mug", seed=5, width=32, height=32, **setting),
                                     make_item("a red mug", seed=5, width=40, height=40, **setting)])  # fmt: skip
    assert ok.status == "pending" and pixels_of([ok])[0].shape == (32, 32, 3)
    assert rounded.status == "failed" and "made 32x32 pixels, not the 40x40 asked for" in rounded.error


def test_validate_names_rows_this_model_cannot_honour(tiny_flux, make_spec, capsys):
    rows = [{"prompt_id": "ok", "prompt": "a red mug"}, {"prompt_id": "wide", "prompt": "a red mug", "width": 40},
            {"prompt_id": "neg", "prompt": "a red mug", "negative_prompt": "blurry"}]  # fmt: skip
    spec = make_spec(rows, model={"id": tiny_flux}, sampler={"name": "flow_match_euler"})
    assert main(["validate", spec]) == 0
    out = capsys.readouterr().out
    assert "row 2 (prompt_id 'wide'): width: 40 is not a multiple of 16" in out
    assert "row 3 (prompt_id 'neg'): negative_prompt: FluxPipeline ignores it" in out
    assert "3 rows, 2 rejected" in out
    bad_spec = make_spec(rows[:1], model={"id": tiny_flux}, sampler={"name": "flow_match_euler"},
                         image={"width": 24, "height": 32})  # fmt: skip
    assert main(["validate", bad_spec]) == 2
    assert "image.width: 24 is not a multiple of 16" in capsys.readouterr().err
