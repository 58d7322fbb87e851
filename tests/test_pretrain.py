"""`fewstep pretrain` end to end on tiny settings: stages, chunked resume, export, bad input."""

import json

from fewstep.cli import main
from fewstep.models.pipeline import VideoPipeline

TINY = ["--set", "codec.steps=3", "--set", "codec.batch_size=2", "--set", "latents.num_clips=64",
        "--set", "teacher.batch_size=4", "--set", "teacher.backbone.depth=1", "--set", "teacher.backbone.hidden_dim=32",
        "--set", "teacher.backbone.num_heads=2", "--set", "teacher.warmup_steps=2"]


def test_pretrain_chunks_resume_and_export(tmp_path):
    work, out = tmp_path / "work", tmp_path / "teacher"
    # a zero time budget stops after the first step of the first stage, with a checkpoint
    args = ["pretrain", "--work", str(work), "--out", str(out), *TINY, "--set", "teacher.steps=4"]
    assert main([*args, "--max-minutes", "0"]) == 0
    assert json.loads((work / "codec_state" / "state.json").read_text())["step"] == 1
    assert not (work / "codec" / "done.json").exists()
    # each next invocation continues: codec step 2, then step 3 (done), latents, one teacher step
    assert main([*args, "--max-minutes", "0"]) == 0
    assert json.loads((work / "codec_state" / "state.json").read_text())["step"] == 2
    assert main([*args, "--max-minutes", "0"]) == 0
    assert (work / "codec" / "done.json").is_file() and (work / "latents.safetensors").is_file()
    assert json.loads((work / "teacher_state" / "state.json").read_text())["step"] == 1
    # then to completion and export
    assert main(args) == 0
    assert json.loads((work / "teacher_state" / "state.json").read_text())["step"] == 4
    pipe = VideoPipeline.load(out)
    frames, res = pipe.generate(["a red circle moves left"], steps=2)
    assert frames.shape == (1, 16, 32, 32, 3) and res.nfe == 2 * 2  # exported with CFG on by default
    assert json.loads((work / "codec" / "done.json").read_text())["psnr_db"] > 0


def test_pretrain_bad_input(tmp_path, capsys):
    assert main(["pretrain", "--work", str(tmp_path), "--stage", "vae"]) == 2
    assert main(["pretrain", "--work", str(tmp_path), "--set", "teacher.stepz=3"]) == 2
    assert "unknown config key 'teacher.stepz'" in capsys.readouterr().err
    assert main(["pretrain", "--work", str(tmp_path / "empty"), "--stage", "export"]) == 2
