"""The loadable text-to-video model: generate, save/load round trip, bad model inputs."""

import json

import numpy as np
import pytest
import torch

from fewstep.errors import UserError
from fewstep.models.pipeline import VideoPipeline, resolve_model
from helpers import make_tiny_pipeline


def test_generate_shapes_nfe_and_determinism(tiny_pipeline):
    prompts = ["a red circle moves left", "a blue square stays still"]
    frames, res = tiny_pipeline.generate(prompts, steps=3, cfg_scale=2.0, seed=1)
    assert frames.shape == (2, 8, 16, 16, 3) and frames.dtype == np.uint8
    assert res.nfe == 6  # 3 CFG steps
    again, _ = tiny_pipeline.generate(prompts, steps=3, cfg_scale=2.0, seed=1)
    assert np.array_equal(frames, again)
    other, _ = tiny_pipeline.generate(prompts, steps=3, cfg_scale=2.0, seed=2)
    assert not np.array_equal(frames, other)
    _, res = tiny_pipeline.generate(prompts, steps=2, cfg_scale=1.0)
    assert res.nfe == 2  # scale 1 is the conditional prediction: no unconditional pass


def test_explicit_student_times_and_consistency_sampler():
    pipe = make_tiny_pipeline(sampler="consistency", times=[1.0, 0.75, 0.5, 0.25, 0.0])
    _, res = pipe.generate(["a red circle moves left"], seed=0)
    assert res.nfe == 4
    assert res.times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # asking for the student's own step count keeps its grid; another count gets an even grid
    assert pipe.sampling_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert pipe.sampling_times(2).tolist() == [1.0, 0.5, 0.0]  # two useful steps, not diffusers' [1, 0.001, 0]
    assert pipe.grid_name(4) == "model" and pipe.grid_name(2) == "uniform"


def test_save_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save(tmp_path / "model")
    loaded = VideoPipeline.load(tmp_path / "model")
    a, _ = tiny_pipeline.generate(["a green cross moves up"], steps=2, seed=3)
    b, _ = loaded.generate(["a green cross moves up"], steps=2, seed=3)
    assert np.array_equal(a, b)
    # saving again replaces the model atomically; no temporary directories are left behind
    tiny_pipeline.save(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_model_inputs(tiny_pipeline, tmp_path):
    with pytest.raises(UserError, match="not a shipped model"):
        resolve_model(tmp_path / "nothing")
    tiny_pipeline.save(tmp_path / "m")
    (tmp_path / "m" / "codec.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read codec.safetensors"):
        VideoPipeline.load(tmp_path / "m")
    tiny_pipeline.save(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "model.json").read_text())
    cfg["backbone"]["depth"] = 3
    (tmp_path / "m2" / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match model.json"):
        VideoPipeline.load(tmp_path / "m2")
    with pytest.raises(UserError, match="unknown word 'purple'"):
        tiny_pipeline.generate(["a purple circle moves left"], steps=1)
    with torch.no_grad():
        assert tiny_pipeline.null_condition(2).context.shape[0] == 2
