"""README "Distil your own teacher": its commands and its config, run as written on a tiny random
WanPipeline and a folder of mp4s made here. The one change is the step budget (the README's 2000
steps at batch 8 become 4 at batch 2, by ``--set`` after the README's arguments); the directory names
are the README's, inside a temporary working directory. The export then samples in diffusers as the
student does in fewstep."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml

from helpers import cli, make_tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
TEACHER = "models/Wan2.1-T2V-1.3B-Diffusers"


def readme_block(marker: str) -> str:
    """The fenced block right after ``<!-- distil-your-own: marker -->``."""
    text = README.read_text()
    match = re.search(rf"<!-- distil-your-own: {marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker!r}"
    return match.group(1)


def write_clips(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i, caption in enumerate(["a cat runs in the park", "a dog runs in the park", "a red circle moves left"]):
        frames = (rng.random((20, 40, 48, 3)) * 255).astype(np.uint8)
        writer = imageio.get_writer(folder / f"clip{i}.mp4", format="FFMPEG", mode="I", fps=16, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        for frame in frames:
            writer.append_data(frame)
        writer.close()
        (folder / f"clip{i}.txt").write_text(caption)


def test_the_readme_commands_distil_and_export_a_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_tiny_wan_pipeline(tmp_path / TEACHER)
    write_clips(tmp_path / "clips")
    config = yaml.safe_load(readme_block("config"))
    assert config["model"] == TEACHER
    Path("distil-wan.yaml").write_text(readme_block("config"))
    commands = [shlex.split(line) for line in readme_block("commands").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["fewstep", "cache"], ["fewstep", "distill"], ["fewstep", "export"]]
    for command in commands:
        argv = command[1:]
        if argv[0] == "distill":
            argv += ["--set", "train.steps=4", "--set", "train.batch_size=2"]
        rc, _, err = cli(capsys, *argv)
        assert rc == 0, f"{' '.join(command)}: {err}"

    manifest = json.loads(Path("runs/wan-cache/manifest.json").read_text())
    assert manifest["count"] == 3 and manifest["complete"]
    run = Path("runs/wan-dollar")
    assert json.loads((run / "run.json").read_text())["student"]["step"] == 4
    record = json.loads(Path("runs/wan-4step/export.json").read_text())
    assert record["exact"] and record["call"]["num_inference_steps"] == 4 and record["sampler"] == "consistency"

    from diffusers import WanPipeline

    from fewstep.models.family import load_model

    student = load_model(run / "student")
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(0))
    ours = student.sample_latents(["a cat runs in the park"], noise=noise, seed=5).x
    pipe = WanPipeline.from_pretrained("runs/wan-4step", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    theirs = pipe("a cat runs in the park", num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                  num_frames=9, latents=noise.clone(), max_sequence_length=16, output_type="latent").frames
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
