"""What the commands write and refuse: --out ownership, other filesystems, read-only targets,
permissions under the umask, one-line errors for unreadable inputs, questionable settings."""

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.errors import UserError
from fewstep.utils.io import OWNER_FILE, OutputDir, read_json
from helpers import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle moves left"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pipeline().save(tmp_path_factory.mktemp("outputs") / "model")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A 2-step 'student': a model with its own explicit sampling times."""
    return make_tiny_pipeline(sampler="consistency", times=[1.0, 0.5, 0.0]).save(
        tmp_path_factory.mktemp("outputs") / "student")


def generate(model_dir, out, *extra):
    return main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--steps", "1", "--out", str(out),
                 *map(str, extra)])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------ --out protection
def test_generate_refuses_a_foreign_non_empty_out_and_keeps_it(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert generate(model_dir, out) == 2
    assert "--overwrite" in one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_second_generate_needs_overwrite_and_never_deletes_user_files(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert generate(model_dir, out, "--num", "2") == 0
    first = json.loads((out / OWNER_FILE).read_text())
    assert first["command"] == "generate" and "samples.npz" in first["files"]
    before = (out / "samples.npz").read_bytes()
    assert generate(model_dir, out, "--seed", "1") == 2  # ours, but not without --overwrite
    assert "'generate'" in one_line(capsys) and (out / "samples.npz").read_bytes() == before
    (out / "my_figure.png").write_bytes(b"user")
    assert generate(model_dir, out, "--seed", "1", "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    # our stale second video (--num 2 before, 1 now) is gone; the user's file is kept
    assert names == [OWNER_FILE, "000_a-red-circle-moves-left.mp4", "my_figure.png", "samples.npz"]
    assert (out / "my_figure.png").read_bytes() == b"user" and (out / "samples.npz").read_bytes() != before


def test_overwrite_refuses_to_replace_a_file_fewstep_did_not_write(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"someone else's")
    assert generate(model_dir, out, "--overwrite") == 2
    assert "samples.npz was not written by fewstep" in one_line(capsys)
    assert (out / "samples.npz").read_bytes() == b"someone else's"


def test_eval_overwrite_keeps_a_user_file_inside_gifs(model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(model_dir), "--steps", "1", "--num", "1", "--out", str(out)]
    assert main(args) == 0
    (out / "gifs" / "my_figure.gif").write_bytes(b"GIF89a user")
    metrics = (out / "metrics.json").read_bytes()
    assert main(args) == 2 and (out / "metrics.json").read_bytes() == metrics
    capsys.readouterr()
    assert main(args + ["--seed", "3", "--overwrite"]) == 0
    assert (out / "gifs" / "my_figure.gif").read_bytes() == b"GIF89a user"
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3


# ------------------------------------------------------------------- other filesystems, read-only targets
def test_out_on_another_filesystem_publishes(monkeypatch, tmp_path):
    """Emulate a mount point: a rename from outside ``out`` into it fails with EXDEV, as the kernel does."""
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.replace

    def replace(src, dst):
        inside = lambda p: Path(p).resolve().is_relative_to(out.resolve())  # noqa: E731
        if inside(dst) != inside(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with OutputDir(out, "test") as stage:
        assert stage.parent == out  # staged on the destination's own filesystem
        (stage / "a.json").write_text("{}")
        (stage / "sub").mkdir()
        (stage / "sub" / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE, "a.json", "sub"]


def _mount_tmpfs(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join(["size=16m", *options])
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_real_mount_points(model_dir, tmp_path, capsys):
    """A tmpfs mounted as --out (writable and read-only), where the machine lets us mount."""
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    if not (_mount_tmpfs(rw) and _mount_tmpfs(ro, "ro")):
        pytest.skip("cannot mount a tmpfs here (needs privileges)")
    try:
        assert generate(model_dir, rw) == 0 and (rw / "samples.npz").is_file()
        assert generate(model_dir, ro) == 2
        assert f"--out {ro} is not writable" in one_line(capsys)
    finally:
        subprocess.run(["umount", str(rw)])
        subprocess.run(["umount", str(ro)])


def test_unwritable_out_is_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: refuse the probe as a read-only mount would
        import tempfile

        real = tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **k):
            if dir is not None and Path(dir).resolve() == out.resolve():
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    else:
        out.chmod(0o555)
    loaded = []
    monkeypatch.setattr("fewstep.models.pipeline.VideoPipeline.load", lambda *a, **k: loaded.append(1))
    assert generate(model_dir, out) == 2
    assert "is not writable" in one_line(capsys) and not loaded  # refused before the model was loaded


# ------------------------------------------------------------------------------------------ permissions
def test_outputs_follow_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "ev"
        assert main(["eval", "--model", str(model_dir), "--steps", "1", "--num", "1", "--out", str(out)]) == 0
        saved = make_tiny_pipeline().save(tmp_path / "student")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o755 and mode(out / "gifs") == 0o755 and mode(saved) == 0o755
    for f in [out / "report.html", out / "metrics.json", next((out / "gifs").iterdir()), saved / "model.json",
              saved / "backbone.safetensors"]:
        assert mode(f) == 0o644, f


# ------------------------------------------------------------------------------ unreadable inputs: one line
@pytest.mark.parametrize("content,message", [(b"{not json", "is not valid JSON"), (b"\xff\xfe\x00", "is not UTF-8"),
                                             (b"[1, 2]", "must hold a JSON object")])
def test_bad_model_json_is_one_line(model_dir, tmp_path, capsys, content, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.json").write_bytes(content)
    assert generate(bad, tmp_path / "out") == 2
    assert message in one_line(capsys) and not (tmp_path / "out").exists()


def test_bad_config_yaml_encoding_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  lr: \xff\n")
    assert main(["distill", "--recipe", "finetune", "--config", str(cfg), "--dry-run"]) == 2
    assert "is not UTF-8" in one_line(capsys)


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(UserError, match=r"x.json is not valid JSON"):
        read_json(tmp_path / "x.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_cuda_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["distill", "--recipe", "finetune", "--set", f"model={model_dir}", "--set", "train.device=cuda",
               "--set", "train.steps=1", "--out", str(out)])
    assert rc == 2 and "train.device" in one_line(capsys) and not out.exists()


# ------------------------------------------------------------------------------------ questionable input
def test_negative_cfg_and_absurd_steps_are_refused(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "a", "--cfg", "-1") == 2
    assert "must be >= 0" in one_line(capsys)
    assert generate(model_dir, tmp_path / "b", "--steps", "5000") == 2
    assert "1000 timesteps" in one_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unusual_settings_warn(student_dir, tmp_path, capsys):
    assert generate(student_dir, tmp_path / "a", "--steps", "20") == 0  # replaces --steps 1 (last wins)
    err = capsys.readouterr().err
    assert "warning: --steps 20 on a model distilled for 2 steps" in err
    assert generate(student_dir, tmp_path / "b", "--cfg", "0.5") == 0
    assert "warning: --cfg 0.5 is below 1" in capsys.readouterr().err


def test_bench_refuses_the_teacher_as_its_own_student(model_dir, capsys):
    assert main(["bench", "--student", str(model_dir), "--teacher", str(model_dir)]) == 2
    assert "are the same model" in one_line(capsys)


def test_eval_records_the_grid(student_dir, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(student_dir), "--num", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["grid"] == "model" and metrics["times"] == [1.0, 0.5, 0.0]
    out2 = tmp_path / "ev1"
    assert main(["eval", "--model", str(student_dir), "--num", "1", "--steps", "4", "--out", str(out2)]) == 0
    metrics = json.loads((out2 / "metrics.json").read_text())
    assert metrics["grid"] == "uniform" and metrics["times"] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_eval_warns_on_an_untrained_student(model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "student")
    (run / "run.json").write_text(json.dumps({"recipe": "dollar", "student": {"step": 0, "of": 400}}))
    assert generate(run / "student", tmp_path / "out") == 0
    assert "holds step 0 of 400 (untrained" in capsys.readouterr().err
