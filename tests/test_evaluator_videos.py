"""The ``videos`` evaluator and ``fewstep eval`` on a real-teacher family (a tiny random WanPipeline built
here): a DOLLAR run writes mp4s of its samples and generic metrics (+ a Fréchet distance on a tiny
DINOv2's features to a latent cache of clips) into RUN/evals; toy_vbench on Wan and a videos evaluator
that cannot work are one line with nothing written; ``fewstep eval`` reports the generic metrics."""

from __future__ import annotations

import json
import math

import imageio.v2 as imageio
import numpy as np
import pytest

from fewstep.cache import build_cache
from fewstep.data.cache import read_inputs
from fewstep.errors import UserError
from fewstep.eval.report import write_mp4
from fewstep.models.family import load_model
from fewstep.recipes.evaluators import parse_evaluator_config
from helpers import cli, make_tiny_dinov2

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat runs in the park", "a dog runs"]
FRAMES = 9  # the tiny Wan's clip length


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dino")


@pytest.fixture(scope="module")
def reference_cache(wan_dir, tmp_path_factory):
    """A latent cache (fewstep cache) of 4 smooth random 32² clips of 9 frames at 16 fps, made with the tiny Wan."""
    videos = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    for i in range(4):
        base = rng.integers(0, 256, (1, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)  # (1, 32, 32, 3) blocks
        clip = np.clip(base + np.arange(FRAMES)[:, None, None, None] * 6, 0, 255).astype(np.uint8)  # (T, 32, 32, 3)
        write_mp4(videos / f"{i}.mp4", clip, fps=16, scale=1)
        (videos / f"{i}.txt").write_text(PROMPTS[i % 2])
    out = tmp_path_factory.mktemp("cache") / "cache"
    build_cache(load_model(wan_dir), read_inputs(videos=videos), out, fps=16)
    return out


def distill_args(wan_dir, out, *extra):
    sets = [f"model={wan_dir}", "train.steps=4", "train.batch_size=2", "train.eval_every=2", "train.eval_prompts=2",
            "train.eval_samples=2", "train.checkpoint_every=0", "train.log_every=1", "train.tensorboard=false", *extra]
    return ["distill", "--recipe", "dollar", "--out", out, *[a for s in sets for a in ("--set", s)]]


def test_a_dollar_run_on_wan_writes_videos_and_generic_metrics(capsys, wan_dir, dino_dir, reference_cache, tmp_path):
    run = tmp_path / "run"
    evaluator = (f"evaluator={{kind: videos, prompts: [{', '.join(PROMPTS)}], fps: 12, features: {dino_dir}, "
                 f"reference: {reference_cache}, reference_clips: 3}}")
    rc, out, err = cli(capsys, *distill_args(wan_dir, run, evaluator))
    assert rc == 0, err

    # 1. mp4s of every prompt × seed, readable, with the model's frame count and fps
    for step in (2, 4):
        names = sorted(p.name for p in (run / "evals" / f"step_{step:06d}").iterdir())
        assert names == [f"{p:03d}_{slug}_s{k}.mp4" for p, slug in enumerate(["a-cat-runs-in-the-park", "a-dog-runs"])
                         for k in range(2)]
    reader = imageio.get_reader(run / "evals" / "step_000002" / "001_a-dog-runs_s1.mp4")
    frames = [f for f in reader]
    assert len(frames) == FRAMES and frames[0].shape == (256, 256, 3)  # 32² upscaled ×8
    assert reader.get_meta_data()["fps"] == pytest.approx(12)
    reader.close()

    # 2. the report: generic metrics per prompt and their means, health statistics against the teacher's samples
    report = json.loads((run / "evals" / "step_000002.json").read_text())
    assert report["step"] == 2 and list(report["results"]) == ["4"]  # the student's 4-step sampler (dollar4)
    result = report["results"]["4"]
    assert set(result["scores"]) == {"sharpness", "flicker", "vendi", "fd"}
    assert all(math.isfinite(v) for v in result["scores"].values())
    assert result["scores"]["fd"] >= 0 and 1.0 <= result["scores"]["vendi"] <= 2.0
    assert 0 <= result["scores"]["flicker"] <= 1 and result["scores"]["sharpness"] > 0
    assert list(result["prompts"]) == PROMPTS
    for stats in result["prompts"].values():
        assert {"sharpness", "flicker", "vendi", "diversity", "reference_diversity", "temporal_change"} <= set(stats)
    assert np.mean([s["flicker"] for s in result["prompts"].values()]) == pytest.approx(result["scores"]["flicker"])
    assert result["videos"][0] == "evals/step_000002/000_a-cat-runs-in-the-park_s0.mp4"

    # 3. logged, and the reference statistics fitted once, kept in the run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "eval/4step/sharpness" in r}
    assert sorted(logged) == [2, 4] and logged[2]["eval/4step/fd"] == pytest.approx(result["scores"]["fd"])
    assert len(list((run / "evals").glob("reference_*.npz"))) == 1
    assert "fewstep generate --model" in out and PROMPTS[0] in out  # the example prompt is the first caption


def test_toy_vbench_on_wan_and_bad_videos_configs_are_one_line(capsys, wan_dir, dino_dir, tmp_path):
    rc, _, err = cli(capsys, *distill_args(wan_dir, tmp_path / "toy"))
    assert rc == 2 and err.count("\n") == 1
    assert "evaluator: {kind: videos, prompts: FILE}" in err
    assert not (tmp_path / "toy").exists()  # refused before anything is written

    rc, _, err = cli(capsys, *distill_args(wan_dir, tmp_path / "nofile",
                                           f"evaluator={{kind: videos, prompts: {tmp_path / 'nope.txt'}}}"))
    assert rc == 2 and "evaluator.prompts" in err and "no such file" in err and not (tmp_path / "nofile").exists()

    with pytest.raises(UserError, match="evaluator.features.*not a supported vision model|no config.json"):
        parse_evaluator_config({"kind": "videos", "prompts": PROMPTS, "features": str(wan_dir)})
    with pytest.raises(UserError, match="set evaluator.features too"):
        parse_evaluator_config({"kind": "videos", "prompts": PROMPTS, "reference": str(tmp_path)})
    config = parse_evaluator_config({"kind": "videos", "prompts": PROMPTS, "features": str(dino_dir)})
    with pytest.raises(UserError, match="needs a reference"):
        config.check(None, has_teacher=False)
    config.check(None, has_teacher=True)  # the teacher's samples are the reference
    with pytest.raises(UserError, match="unknown word 'cat'"):  # a toy model's captions follow its grammar
        parse_evaluator_config({"kind": "videos", "prompts": PROMPTS}).check("toy", has_teacher=True)


def test_fewstep_eval_on_wan_reports_generic_metrics(capsys, wan_dir, dino_dir, reference_cache, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rc, out, err = cli(capsys, "eval", "--model", wan_dir, "--prompts", prompts, "--out", tmp_path / "eval",
                       "--num", 2, "--steps", 2, "--features", dino_dir, "--reference", reference_cache,
                       "--reference-clips", 3, "--device", "cpu")
    assert rc == 0, err
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert {"sharpness", "flicker", "vendi_pixel", "fd", "nfe", "steps"} <= set(summary)
    assert "total" not in summary and summary["steps"] == 2
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["metric_set"] == "generic" and metrics["num_videos"] == 4 and list(metrics["prompts"]) == PROMPTS
    assert metrics["fd"] >= 0 and metrics["sharpness"] > 0 and 0 <= metrics["flicker"] <= 1
    assert metrics["vendi_pixel"] == pytest.approx(np.mean([m["vendi_pixel"] for m in metrics["prompts"].values()]))
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "sharpness" in page and "flicker" in page and "FD" in page

    rc, _, err = cli(capsys, "eval", "--model", wan_dir, "--out", tmp_path / "none", "--device", "cpu")
    assert rc == 2 and "give --prompts FILE" in err and err.count("\n") == 1 and not (tmp_path / "none").exists()
