"""The evaluation runner, the HTML report and the generate/eval commands, on a tiny random model."""

import json
import math
import re

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.data.toyworld import EVAL_PROMPTS
from fewstep.errors import UserError
from fewstep.eval.features import FeatureNetConfig, VideoFeatureNet, reference_stats
from fewstep.eval.report import write_report
from fewstep.eval.runner import evaluate, evaluate_with_samples, generate_videos
from helpers import make_tiny_pipeline

KEYS = {"total", "quality", "semantic", "dimensions", "fvd", "vendi_pixel", "vendi_feature", "nfe",
        "seconds_per_video", "steps"}


# small pixel models run far faster on one thread when the cores are shared (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def feature_net():
    torch.manual_seed(0)
    return VideoFeatureNet(FeatureNetConfig(frames=8, size=16, channels=[8, 16], spatial_strides=[2, 2],
                                           temporal_kernels=[1, 3], temporal_strides=[1, 2], feature_dim=16))


@pytest.fixture(scope="module")
def ref_stats(feature_net):
    return reference_stats(48, feature_net)


def test_evaluate_returns_every_metric(feature_net, ref_stats):
    pipe = make_tiny_pipeline()
    metrics = evaluate(pipe, steps=3, cfg_scale=3.0, num_per_prompt=2, prompts=EVAL_PROMPTS, seed=0,
                       feature_net=feature_net, ref_stats=ref_stats)
    assert KEYS <= set(metrics)
    assert metrics["nfe"] == 3 * 2 and metrics["steps"] == 3 and metrics["cfg_scale"] == 3.0
    assert metrics["num_videos"] == 2 * len(EVAL_PROMPTS)
    for key in KEYS - {"dimensions"}:
        assert math.isfinite(metrics[key]), key
    assert metrics["dimensions"] and all(math.isfinite(v) for v in metrics["dimensions"].values())
    assert 1.0 <= metrics["vendi_pixel"] <= 2.0 and 1.0 <= metrics["vendi_feature"] <= 2.0
    assert metrics["seconds_per_video"] > 0 and metrics["fvd"] >= 0
    json.dumps(metrics)  # JSON-serialisable as is
    no_cfg = evaluate(pipe, steps=2, cfg_scale=1.0, num_per_prompt=1, prompts=EVAL_PROMPTS[:3],
                      feature_net=feature_net, ref_stats=ref_stats)
    assert no_cfg["nfe"] == 2 and no_cfg["cfg_scale"] is None


def test_generation_does_not_depend_on_batch_size():
    pipe = make_tiny_pipeline()
    prompts = EVAL_PROMPTS[:5]
    a = generate_videos(pipe, prompts, steps=2, cfg_scale=2.0, seed=3, batch_size=2)
    b = generate_videos(pipe, prompts, steps=2, cfg_scale=2.0, seed=3, batch_size=5)
    assert a.frames.shape == (5, 8, 16, 16, 3) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, b.frames)
    with pytest.raises(UserError, match="unknown word 'purple'"):
        generate_videos(pipe, ["a purple circle moves left"], steps=2)
    with pytest.raises(UserError, match="steps=0"):
        generate_videos(pipe, prompts, steps=0)


def test_write_report_references_existing_gifs(tmp_path, feature_net, ref_stats):
    pipe = make_tiny_pipeline()
    prompts = EVAL_PROMPTS[:3]
    results = []
    for steps in (1, 2):
        metrics, frames = evaluate_with_samples(pipe, steps=steps, num_per_prompt=2, prompts=prompts,
                                                feature_net=feature_net, ref_stats=ref_stats)
        assert list(frames) == prompts and frames[prompts[0]].shape == (2, 8, 16, 16, 3)
        results.append((f"<tiny> {steps}-step", metrics, frames))
    page = write_report(tmp_path, results).read_text()
    gifs = re.findall(r"src='(gifs/[^']+\.gif)'", page)
    assert len(gifs) == 3 * 2 * 2
    assert all((tmp_path / g).is_file() for g in gifs)
    assert "&lt;tiny&gt; 1-step" in page and "<script" not in page
    for prompt in prompts:
        assert prompt in page


def test_cli_generate_writes_mp4s_and_samples(tmp_path):
    model_dir = make_tiny_pipeline().save(tmp_path / "model")
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(model_dir), "--prompt", "a red circle moves left", "--prompt",
               "a blue square stays still", "--num", "2", "--steps", "2", "--cfg", "2.0", "--out", str(out)])
    assert rc == 0
    mp4s = sorted(out.glob("*.mp4"))
    assert len(mp4s) == 4 and all(p.stat().st_size > 0 for p in mp4s)
    with np.load(out / "samples.npz") as data:  # no pickle needed
        assert data["frames"].shape == (4, 8, 16, 16, 3) and data["frames"].dtype == np.uint8
        assert list(data["prompts"]) == ["a red circle moves left"] * 2 + ["a blue square stays still"] * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    import imageio.v2 as imageio

    video = imageio.mimread(mp4s[0])  # upscaled ×8, nearest neighbour
    assert len(video) == 8 and video[0].shape == (128, 128, 3)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a purple circle moves left"], "unknown word 'purple'"),
    (["--prompt", "a red circle moves left", "--model", "no-such-model"], "no-such-model"),
    (["--prompt", "a red circle moves left", "--steps", "0"], "steps=0"),
    (["--prompt", "a red circle left"], "malformed prompt"),
    (["--prompt", "a red circle moves left", "--sampler", "heun"], "--sampler 'heun'"),
    (["--prompt", "a red circle moves left", "--grid", "uniform3_shift"], "uniformN_shiftS"),
    (["--prompt", "a red circle moves left", "--grid", "uniform4_shift3", "--steps", "2"], "disagree"),
])
def test_cli_generate_errors_are_one_line(tmp_path, capsys, args, message):
    model_dir = make_tiny_pipeline().save(tmp_path / "model")
    out = tmp_path / "out"
    base = ["generate", "--model", str(model_dir), "--out", str(out)]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_eval_writes_metrics_and_report(tmp_path, capsys, feature_net):
    model_dir = make_tiny_pipeline().save(tmp_path / "model")
    feature_dir = feature_net.save(tmp_path / "features")
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(model_dir), "--steps", "2", "--cfg", "2.0", "--num", "1",
               "--features", str(feature_dir), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(metrics) and metrics["nfe"] == 4
    assert (out / "report.html").is_file() and len(list((out / "gifs").glob("*.gif"))) == len(EVAL_PROMPTS)
    rc = main(["eval", "--model", str(model_dir), "--steps", "2", "--features", str(tmp_path / "nope"),
               "--out", str(tmp_path / "eval2")])
    assert rc == 2 and "feature net" in capsys.readouterr().err and not (tmp_path / "eval2").exists()


def test_sampler_replaces_the_models_own(tmp_path):
    """--sampler consistency: x̂0 re-noised with fresh noise each step instead of the saved Euler sampler;
    --grid: the named grid's times instead of the model's own."""
    from fewstep.eval.runner import set_sampling

    pipe = make_tiny_pipeline()
    assert pipe.sampling.sampler == "euler"
    euler = pipe.sample_latents(["a red circle moves left"], steps=2, cfg_scale=1.0, seed=1).x
    set_sampling(pipe, "consistency")
    cons = pipe.sample_latents(["a red circle moves left"], steps=2, cfg_scale=1.0, seed=1).x
    first = pipe.denoiser.predict(torch.randn(pipe.latent_shape(1), generator=torch.Generator().manual_seed(1)),
                                  torch.ones(1), pipe.encode_prompts(["a red circle moves left"])).x0
    assert (cons - euler).abs().max() > 1e-3 and (cons - first).abs().max() > 0
    set_sampling(pipe, None, "uniform2_shift3")
    assert pipe.sampling.sampler == "consistency"  # None keeps what is there
    assert pipe.sampling.times == [1.0, 0.75, 0.0] and pipe.default_steps() == 2
    shifted = pipe.sample_latents(["a red circle moves left"], cfg_scale=1.0, seed=1).x
    assert (shifted - cons).abs().max() > 1e-3
    model_dir = make_tiny_pipeline().save(tmp_path / "model")
    rc = main(["generate", "--model", str(model_dir), "--prompt", "a red circle moves left", "--steps", "2",
               "--sampler", "consistency", "--out", str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "samples.npz").is_file()
