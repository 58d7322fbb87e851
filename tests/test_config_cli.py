"""Config loading/overrides/errors and the CLI's error contract (one line, exit 2)."""

import subprocess
import sys

import pytest

from fewstep.cli import main
from fewstep.config import StrictModel, apply_overrides, dump_config, load_config
from fewstep.diffusion.schedules import FlowMatchingConfig, VPConfig
from fewstep.models.diffusers_denoiser import DiffusersDenoiserConfig
from fewstep.errors import UserError


class Train(StrictModel):
    lr: float = 1e-4
    steps: int = 100
    betas: tuple[float, float] = (0.9, 0.999)


class Run(StrictModel):
    name: str = "run"
    train: Train = Train()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 0.001\n")
    cfg = load_config(Run, path, ["train.steps=7", "train.betas=[0.0, 0.99]"])
    assert cfg.name == "demo" and cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.train.betas == (0.0, 0.99)
    # the dump round-trips
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(Run, again) == cfg


def test_override_parsing_is_yaml_typed():
    data = apply_overrides({}, ["a.b=1e-5", "a.c=null", "d=true", "e=[1, 2]", "f=hello"])
    assert data == {"a": {"b": 1e-5, "c": None}, "d": True, "e": [1, 2], "f": "hello"}


@pytest.mark.parametrize("override,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; allowed keys here: lr, steps, betas"),
    (["trian.lr=1"], "unknown config key 'trian'"),
    (["train.steps=abc"], "config key 'train.steps': Input should be a valid integer"),
    (["train=3"], "config key 'train'"),
    (["train.lr"], "must look like key.subkey=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(Run, None, override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Run, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Run, listy)


def test_schedule_union_and_denoiser_config():
    cfg = load_config(DiffusersDenoiserConfig, None, ["backbone=wan", "path=/x", "schedule.kind=vp",
                                                      "schedule.zero_terminal_snr=true"])
    assert isinstance(cfg.schedule, VPConfig) and cfg.schedule.zero_terminal_snr
    assert FlowMatchingConfig(shift=5).build().shift == 5
    with pytest.raises(UserError, match="config key 'schedule.shift': Input should be greater than 0"):
        load_config(DiffusersDenoiserConfig, None, ["backbone=wan", "path=/x", "schedule.shift=-1"])
    with pytest.raises(UserError, match="backbone"):
        load_config(DiffusersDenoiserConfig, None, ["backbone=sora", "path=/x"])
    with pytest.raises(UserError, match="no diffusers model"):
        load_config(DiffusersDenoiserConfig, None, ["backbone=wan", "path=/does/not/exist"]).build()


def test_cli_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert "fewstep 0.1.0" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "timesteps" in capsys.readouterr().out


def test_cli_timesteps_prints_the_grid(capsys):
    assert main(["timesteps", "--schedule", "vp", "--grid", "dollar4"]) == 0
    out = capsys.readouterr().out
    assert "749.00" in out and "249.00" in out


def test_cli_user_error_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "timesteps", "--grid", "dollar3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown timestep grid 'dollar3'")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "timesteps", "--steps", "4", "--shift", "-2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "schedule" not in proc.stdout
    assert "config key 'shift'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
