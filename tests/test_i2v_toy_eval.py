"""VBench-I2V's i2v_subject / i2v_background in the toy world, and the toy VBench of an image-to-video model
(each sample on the first frame of a toy clip of its caption, the same frames for every model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.data.toyworld import condition_frame, condition_seed, render_clip
from fewstep.eval.i2v import score_i2v_clip, score_i2v_clips
from fewstep.models.pipeline import image_to_video
from helpers import make_tiny_pipeline, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a green square moves right slowly on a dark background"


@pytest.fixture(scope="module")
def clip():
    video, meta = render_clip(PROMPT, condition_seed(PROMPT, 0))
    return video, meta


def test_a_clip_is_consistent_with_its_own_first_frame(clip):
    video, _ = clip
    scores = score_i2v_clip(video[0], video)
    assert scores["i2v_subject"] > 0.9 and scores["i2v_background"] > 0.99
    still, _ = render_clip("a red circle stays still", 3)
    assert score_i2v_clip(still[0], still) == {"i2v_subject": 1.0, "i2v_background": 1.0}


def test_each_dimension_sees_its_own_change(clip):
    video, meta = clip
    own = score_i2v_clip(video[0], video)
    # the same clip on the other background (same seed: the same subject and path): background loses, subject
    # hardly (its contrast, hence its soft edge, changes a little)
    light, light_meta = render_clip(PROMPT.replace("dark", "light"), condition_seed(PROMPT, 0))
    assert light_meta.start == meta.start and light_meta.colour_rgb == meta.colour_rgb
    changed = score_i2v_clip(video[0], light)
    assert changed["i2v_background"] < own["i2v_background"] - 0.3
    assert changed["i2v_subject"] > own["i2v_subject"] - 0.15
    # another subject colour (the background untouched): subject loses
    recoloured = video.copy()
    subject = np.linalg.norm(video.astype(float) - np.array(meta.background_rgb), axis=-1) > 60  # (T, H, W)
    recoloured[subject] = (255, 0, 255)
    assert score_i2v_clip(video[0], recoloured)["i2v_subject"] < own["i2v_subject"] - 0.3
    # the same clip started elsewhere (rolled by 8 px): the scene departs from the image
    moved = np.roll(video, 8, axis=1)
    assert score_i2v_clip(video[0], moved)["i2v_background"] < own["i2v_background"] - 0.05
    # a clip of another seed of the caption is not conditioned on this frame
    other, _ = render_clip(PROMPT, condition_seed(PROMPT, 1))
    assert score_i2v_clips([video[0]], [other])["i2v_subject"] < own["i2v_subject"] - 0.2


def test_the_toy_vbench_of_an_image_to_video_model():
    from fewstep.eval.features import VideoFeatureNet
    from fewstep.eval.runner import evaluate_with_samples

    t2v = make_tiny_pipeline()
    i2v = image_to_video(t2v)
    perturb(i2v.denoiser.backbone.module.patch_embed, scale=0.2, seed=1)
    i2v.eval()
    prompts = ["a red circle moves left", "a blue square stays still"]
    net = VideoFeatureNet.load()
    metrics, videos = evaluate_with_samples(i2v, steps=2, num_per_prompt=2, prompts=prompts, feature_net=net,
                                            reference_clips=8)
    dims = metrics["dimensions"]
    assert {"i2v_subject", "i2v_background"} <= set(dims)
    assert metrics["i2v"] == pytest.approx((dims["i2v_subject"] + dims["i2v_background"]) / 2)
    assert metrics["total_i2v"] == pytest.approx((metrics["quality"] + metrics["i2v"]) / 2)
    # independent: sample j of each prompt on the first frame of toy clip j of that caption
    images = np.stack([condition_frame(p, j, 8, 16) for p in prompts for j in range(2)])
    assert np.array_equal(images[1], render_clip(prompts[0], condition_seed(prompts[0], 1), 8, 16)[0][0])
    got = np.concatenate([videos[p] for p in prompts])
    assert metrics["dimensions"]["i2v_subject"] == pytest.approx(score_i2v_clips(images, got)["i2v_subject"])
    from fewstep.utils.frames import to_unit

    noise = torch.randn(i2v.latent_shape(4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = i2v.generate([p for p in prompts for _ in range(2)], steps=2, noise=noise,
                               images=torch.from_numpy(to_unit(images)))
    assert np.array_equal(got, want)
    # a text-to-video model keeps its metrics as they were
    plain, _ = evaluate_with_samples(t2v, steps=1, num_per_prompt=1, prompts=prompts[:1], feature_net=net,
                                     reference_clips=8)
    assert "i2v" not in plain and not any(k.startswith("i2v") for k in plain["dimensions"])
