"""``fewstep demo`` (distil → evaluate → report) and ``fewstep bench`` (speed, reward-step memory),
on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.demo import run_demo, summary_table
from fewstep.bench import bench_reward_memory, bench_speed, peak_memory
from fewstep.models.pipeline import VideoPipeline
from helpers import cli, make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DEMO = ["preset=steps2", "train.steps=6", "train.batch_size=2", "train.log_every=1",
             "train.checkpoint_every=0", "train.tensorboard=false", "roles.student.every=2"]


def test_demo_distils_evaluates_and_reports(teacher_dir, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, model=str(teacher_dir), overrides=TINY_DEMO, teacher_steps=3, student_steps=(2, 1),
                       num=1)
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) >= {"teacher", "teacher_few_step", "students", "seconds"}
    assert set(on_disk["students"]) == {"2", "1"}
    assert on_disk["teacher"]["steps"] == 3 and on_disk["teacher_few_step"]["steps"] == 2
    assert on_disk["students"]["2"]["nfe"] == 2 and on_disk["students"]["1"]["nfe"] == 1  # no CFG
    assert on_disk["students"]["2"]["total"] == pytest.approx(summary["students"]["2"]["total"])
    assert on_disk["seconds"]["total"] >= on_disk["seconds"]["distill"] > 0
    html = (out / "report.html").read_text()
    assert "losses.png" in html and html.count("<img") > 5 and "Summary" in html
    assert (out / "losses.png").stat().st_size > 1000
    VideoPipeline.load(out / "run" / "student")  # the distilled student is a loadable model
    table = summary_table(summary)
    assert "student 2-step" in table and "teacher (few-step)" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_peak_memory_sees_a_transient_allocation():
    mib = 2**20

    def work():
        x = torch.ones(mib)  # 4 MiB
        y = x * 2  # 8 MiB alive here: the peak
        del x
        z = y + 1  # 8 MiB again
        return float(z.sum())

    assert peak_memory(work, torch.device("cpu")) == pytest.approx(8 * mib, abs=1024)


def test_bench_speed_reports_ratios():
    teacher = make_tiny_pipeline(cfg_scale=3.0)
    student = make_tiny_pipeline(seed=1)
    result = bench_speed(student, teacher, student_steps=(2, 1), teacher_steps=5, num_videos=2, repeats=1)
    assert result["teacher"]["nfe"] == 10
    s2, s1 = result["students"]["2"], result["students"]["1"]
    assert s2["nfe"] == 2 and s2["nfe_ratio"] == 5 and s1["nfe_ratio"] == 10
    for s in (s1, s2):
        sampling = s["seconds_per_video"]["sampling"]
        assert 0 < sampling <= s["seconds_per_video"]["end_to_end"]
        assert s["speedup"]["sampling"] == pytest.approx(result["teacher"]["seconds_per_video"]["sampling"] / sampling)


def test_latent_reward_step_needs_less_memory_than_the_pixel_reward_step():
    student = make_tiny_pipeline()
    mem = bench_reward_memory(student, reward="sharpness", batch_size=2, steps=2)
    for scope in ("reward", "step"):
        m = mem[scope]
        assert 0 < m["lrm_bytes"] < m["pixel_bytes"]
        assert m["ratio"] == pytest.approx(m["lrm_bytes"] / m["pixel_bytes"])
    assert mem["step"]["pixel_bytes"] > mem["reward"]["pixel_bytes"]  # the student's graph comes on top
    assert not any(p.requires_grad for p in student.denoiser.parameters())  # left as found


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """Another tiny model standing in for a distilled student (bench refuses the teacher itself)."""
    return make_tiny_pipeline(seed=1).save(tmp_path_factory.mktemp("bench") / "student")


def test_bench_cli_rejects_a_non_differentiable_reward(teacher_dir, student_dir, capsys):
    rc, _, err = cli(capsys, "bench", "--student", student_dir, "--teacher", teacher_dir, "--steps", "1",
                     "--teacher-steps", "2", "--num", "1", "--repeats", "1", "--reward", "jpeg")
    assert rc == 2 and err.count("\n") == 1 and "jpeg" in err


@pytest.mark.parametrize("command", ["bench", "eval", "generate", "synth"])
@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_device_option_errors_are_one_line(teacher_dir, student_dir, tmp_path, capsys, command, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = {"bench": ["--student", student_dir, "--teacher", teacher_dir],
            "eval": ["--model", teacher_dir, "--out", tmp_path / "out"],
            "generate": ["--model", teacher_dir, "--prompt", "a red circle", "--out", tmp_path / "out"],
            "synth": ["--teacher", teacher_dir, "--num", "1", "--out", tmp_path / "out"]}[command]
    rc, _, err = cli(capsys, command, *args, "--device", device)
    assert rc == 2 and err.count("\n") == 1 and "--device" in err
    assert not (tmp_path / "out").exists()


def test_bench_cli_writes_json(teacher_dir, student_dir, tmp_path, capsys):
    rc, out, err = cli(capsys, "bench", "--student", student_dir, "--teacher", teacher_dir, "--steps", "2",
                       "--teacher-steps", "4", "--num", "1", "--repeats", "1", "--reward", "sharpness",
                       "--memory-batch", "1", "--out", tmp_path / "bench.json")
    assert rc == 0, err
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["speed"]["students"]["2"]["nfe_ratio"] == 2 and data["memory"]["reward"]["ratio"] > 0
    assert "student 2 steps" in out
