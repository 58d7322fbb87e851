"""The pipeline seam: load_model picks a model's family by what its directory holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.cli import main
from fewstep.errors import UserError
from fewstep.models import family as family_module
from fewstep.models.family import SHIPPED, Family, VideoModel, load_model, model_family, register_family
from fewstep.models.pipeline import VideoPipeline


class FakeModel(nn.Module):
    """A second family: a directory with ``fake.json``; remembers where it was loaded from."""

    def __init__(self, directory, device):
        super().__init__()
        self.directory, self.device = directory, device

    @classmethod
    def load(cls, directory, device="cpu"):
        return cls(directory, device)


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setattr(family_module, "FAMILIES", dict(family_module.FAMILIES))
    return register_family(Family("fake", lambda d: (d / "fake.json").is_file(), FakeModel, "fake.json"))


def test_shipped_name_loads_the_toy_family():
    pipe = load_model("toy-teacher")
    assert isinstance(pipe, VideoPipeline) and isinstance(pipe, VideoModel) and not pipe.training
    assert model_family("toy-teacher").name == "toy"
    assert pipe.geometry == (16, 32, 32) and pipe.text_dim == pipe.config.text_encoder.dim
    assert pipe.hidden_dim == pipe.config.backbone.hidden_dim
    assert pipe.denoisers() == {"denoiser": pipe.denoiser}
    assert SHIPPED["toy-teacher"].is_dir()


def test_directory_loads_by_its_family(tiny_pipeline, tmp_path):
    tiny_pipeline.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is VideoPipeline
    a, _ = tiny_pipeline.generate(["a red circle moves left"], steps=2, seed=1)
    b, _ = loaded.generate(["a red circle moves left"], steps=2, seed=1)
    assert np.array_equal(a, b)


def test_seam_encode_decode_and_sampling_setter(tiny_pipeline):
    frames = torch.rand(2, *tiny_pipeline.geometry, 3) * 2 - 1  # (B, T, H, W, 3)
    with torch.no_grad():
        latents = tiny_pipeline.encode(frames)
        assert latents.shape == tiny_pipeline.latent_shape(2)
        assert tiny_pipeline.decode(latents).shape == frames.shape
    sampling = tiny_pipeline.sampling.model_copy(update={"times": [1.0, 0.5, 0.0], "sampler": "consistency"})
    tiny_pipeline.sampling = sampling
    assert tiny_pipeline.config.sampling == sampling and tiny_pipeline.default_steps() == 2


def test_unknown_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError, match=r"not a shipped model \(toy-teacher, toy-teacher-i2v\) nor a model directory "
                                            r"\(expected model.json with \"kind\": \"toy\" \(toy\) or model_index.json of a "
                                            r"diffusers pipeline \(WanPipeline.*\) \(diffusers\)\)"):
            load_model(where)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.json").write_text(json.dumps({"kind": "sora"}))
    rc = main(["generate", "--model", str(tmp_path / "other"), "--prompt", "a red circle moves left",
               "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and 'expected model.json with "kind": "toy"' in err, err


def test_a_registered_family_is_chosen_by_its_own_detect(fake_family, tiny_pipeline, tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "fake.json").write_text("{}")
    model = load_model(tmp_path / "fake", "cpu")
    assert isinstance(model, FakeModel) and model.directory == tmp_path / "fake"
    assert model_family(tmp_path / "fake") is fake_family
    tiny_pipeline.save(tmp_path / "toy")  # the toy family still gets its own directories
    assert type(load_model(tmp_path / "toy")) is VideoPipeline
    with pytest.raises(UserError, match=r"\(toy\) or .*\(diffusers\) or fake.json \(fake\)"):  # the error names every family
        load_model(tmp_path / "nothing")


def test_a_family_name_is_registered_once(fake_family):
    assert register_family(fake_family) is fake_family  # the same family again: a no-op
    with pytest.raises(AssertionError, match="registered twice"):
        register_family(Family("fake", lambda d: False, FakeModel, "nothing"))
