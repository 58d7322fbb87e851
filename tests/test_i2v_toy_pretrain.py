"""`fewstep pretrain --stage i2v`: the image-to-video toy teacher fine-tuned from a text-to-video one, on tiny
settings: chunked resume equals one run, the export keeps the source's encoders, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.models.pipeline import VideoPipeline
from helpers import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def args(source, work, out, *extra) -> list[str]:
    sets = [f"i2v.source={source}", "i2v.num_clips=64", "i2v.steps=4", "i2v.batch_size=2", "i2v.warmup_steps=2",
            "checkpoint_every=2", *extra]
    return ["pretrain", "--stage", "i2v", "--work", str(work), "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_i2v_stage_resumes_exactly_and_exports(tmp_path, capsys):
    source = make_tiny_pipeline().save(tmp_path / "t2v")
    # one uninterrupted run
    assert main(args(source, tmp_path / "w1", tmp_path / "once")) == 0
    # the same in chunks: a zero budget stops after one step, with a checkpoint; each call continues
    chunked = args(source, tmp_path / "w2", tmp_path / "chunked")
    assert main([*chunked, "--max-minutes", "0"]) == 0
    assert json.loads((tmp_path / "w2" / "i2v_state" / "state.json").read_text())["step"] == 1
    assert not (tmp_path / "chunked").exists()
    assert main([*chunked, "--max-minutes", "0"]) == 0
    assert json.loads((tmp_path / "w2" / "i2v_state" / "state.json").read_text())["step"] == 2
    assert main(chunked) == 0
    once, resumed = load_file(tmp_path / "once" / "backbone.safetensors"), load_file(
        tmp_path / "chunked" / "backbone.safetensors")
    assert once.keys() == resumed.keys() and all(torch.equal(once[k], resumed[k]) for k in once)
    # the exported teacher: image-to-video, the source's codec and caption encoder, weights that moved
    teacher, t2v = VideoPipeline.load(tmp_path / "once"), VideoPipeline.load(source)
    assert teacher.image_conditioned and teacher.config.sampling == t2v.config.sampling
    for name in ("codec", "text_encoder"):
        a, b = getattr(teacher, name).state_dict(), getattr(t2v, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    patch = t2v.config.backbone.patch_size
    new_columns = once["patch_embed.weight"][:, t2v.config.backbone.in_channels * patch[0] * patch[1] * patch[2]:]
    assert new_columns.shape[1] == 5 * patch[0] * patch[1] * patch[2]  # image_mask + image_latent, channel-major
    assert new_columns.abs().max() > 0  # trained away from their zero start
    # its model card says how it was made, with the run's own settings
    card = (tmp_path / "once" / "README.md").read_text()
    assert card.startswith("# toy-teacher-i2v") and "64 toy training clips" in card and str(source) in card


def test_i2v_stage_bad_source(tmp_path, capsys):
    source = make_tiny_pipeline().save(tmp_path / "t2v")
    assert main(args(source, tmp_path / "w", tmp_path / "o", "i2v.steps=1")) == 0
    capsys.readouterr()
    assert main(args(tmp_path / "o", tmp_path / "w2", tmp_path / "o2")) == 2  # already image-to-video
    err = capsys.readouterr().err
    assert "i2v.source" in err and "text-to-video toy teacher" in err and err.count("\n") == 1
    assert main(args(tmp_path / "missing", tmp_path / "w3", tmp_path / "o3")) == 2
