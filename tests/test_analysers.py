"""Toy VBench analysers: real clips score high, each kind of wrong clip scores low."""

import time

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fewstep.data import toyworld as tw
from fewstep.data.toyworld import (
    COLOURS,
    SHAPES,
    Prompt,
    parse_prompt,
    render_clip,
    sample_prompt,
    shape_coverage,
    to_unit,
)
from fewstep.errors import UserError
from fewstep.eval import analysers as A

N_CLIPS = 200


@pytest.fixture(scope="module")
def real():
    """N_CLIPS (video, prompt, meta) triples with random prompts and seeds."""
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(N_CLIPS):
        prompt = parse_prompt(sample_prompt(rng))
        video, meta = render_clip(prompt, int(rng.integers(2**40)))
        out.append((video, prompt, meta))
    return out


@pytest.fixture(scope="module")
def real_scores(real):
    return A.score_clips([v for v, _, _ in real], [p for _, p, _ in real])


def moving(real):
    return [(v, p, m) for v, p, m in real if p.motion != "still"]


def test_real_clips_score_high_on_every_dimension(real_scores):
    for dim in A.SEMANTIC_DIMS:
        assert real_scores[dim] >= 0.95, (dim, real_scores)
    for dim in A.QUALITY_DIMS:
        assert real_scores[dim] >= 0.9, (dim, real_scores)
    summary = A.aggregate(real_scores)
    assert summary["semantic"] >= 0.95 and summary["quality"] >= 0.9


def test_wrong_colour_scores_zero_on_colour(real, real_scores):
    names = list(COLOURS)
    clips = []
    for i, (_, p, m) in enumerate(real):
        wrong = names[(names.index(p.colour) + 1 + i % 5) % len(names)]
        clips.append(render_clip(Prompt(wrong, p.shape, p.motion, p.speed, p.background), i)[0])
    scores = A.score_clips(clips, [p for _, p, _ in real])
    assert scores["colour"] <= 0.02
    assert scores["shape"] >= 0.95  # the other dimensions are untouched


def test_wrong_shape_scores_low_on_shape(real):
    clips = []
    for i, (_, p, _) in enumerate(real):
        wrong = SHAPES[(SHAPES.index(p.shape) + 1 + i % 3) % len(SHAPES)]
        clips.append(render_clip(Prompt(p.colour, wrong, p.motion, p.speed, p.background), i)[0])
    scores = A.score_clips(clips, [p for _, p, _ in real])
    assert scores["shape"] <= 0.05
    assert scores["colour"] >= 0.95


def test_each_shape_is_recognised_from_every_other():
    for truth in SHAPES:
        video, _ = render_clip(f"a green {truth} moves right slowly", 5)
        labels = A.classify_shapes(A.extract_subject(video))
        assert labels == [truth] * len(video)


def test_reversed_motion_scores_zero_on_motion(real):
    clips = moving(real)
    scores = A.score_clips([v[::-1] for v, _, _ in clips], [p for _, p, _ in clips])
    assert scores["motion"] == 0.0
    assert scores["dynamic_degree"] == 1.0  # it still moves, just the wrong way


def test_frozen_clips_of_moving_prompts_score_zero_on_motion_and_dynamics(real):
    clips = moving(real)
    frozen = [np.repeat(v[:1], len(v), axis=0) for v, _, _ in clips]  # first frame repeated
    scores = A.score_clips(frozen, [p for _, p, _ in clips])
    assert scores["motion"] == 0.0 and scores["dynamic_degree"] == 0.0


def test_drifting_clip_of_a_still_prompt_scores_zero_on_dynamics():
    video, _ = render_clip("a red square moves left quickly", 1)
    scores = A.score_clip(video, "a red square stays still")
    assert scores["dynamic_degree"] == 0.0 and scores["motion"] == 0.0
    still, _ = render_clip("a red square stays still", 1)
    assert A.score_clip(still, "a red square stays still")["dynamic_degree"] == 1.0


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_blurred_clips_score_lower_on_sharpness(real, real_scores, sigma):
    blurred = [
        np.clip(gaussian_filter(v.astype(np.float32), (0, sigma, sigma, 0)).round(), 0, 255)
        .astype(np.uint8)
        for v, _, _ in real
    ]
    scores = A.score_clips(blurred, [p for _, p, _ in real])
    assert scores["sharpness"] < 0.6 * real_scores["sharpness"]
    assert scores["colour"] >= 0.95 and scores["motion"] >= 0.95  # semantics survive blur


def test_flickering_background_scores_low_on_flicker(real):
    rng = np.random.default_rng(0)
    clips = []
    for video, _, meta in real:
        dx, dy = tw.DIRECTIONS[meta.motion]
        t = np.arange(len(video))[:, None]
        centres = np.array(meta.start)[None] + t * meta.speed_px * np.array([dx, dy])
        a = shape_coverage(meta.shape, centres, meta.size_px, video.shape[1])[..., None]
        shift = rng.uniform(-20, 20, size=(len(video), 1, 1, 1))  # per-frame brightness shift
        clips.append(np.clip(video + shift * (1 - a), 0, 255).round().astype(np.uint8))
    scores = A.score_clips(clips, [p for _, p, _ in real])
    assert scores["background_flicker"] < 0.3
    assert scores["colour"] >= 0.95 and scores["shape"] >= 0.95


def test_wrong_background_scores_zero_on_background():
    video, _ = render_clip("a blue circle moves up on a light background", 4)
    assert A.score_clip(video, "a blue circle moves up on a light background")["background"] == 1
    assert A.score_clip(video, "a blue circle moves up on a dark background")["background"] == 0
    assert "background" not in A.score_clip(video, "a blue circle moves up")


def test_jittering_subject_scores_low_on_smoothness():
    video, meta = render_clip("a white cross moves right slowly on a dark background", 9)
    rng = np.random.default_rng(0)
    t = np.arange(len(video))[:, None]
    centres = np.array(meta.start)[None] + t * np.array([meta.speed_px, 0.0])
    centres += rng.uniform(-2, 2, size=centres.shape)  # per-frame jumps of up to 2 px
    a = shape_coverage("cross", centres, meta.size_px, video.shape[1])[..., None]
    jittery = ((1 - a) * np.array(meta.background_rgb) + a * np.array(meta.colour_rgb)).round()
    scores = A.score_clip(jittery.astype(np.uint8), meta.prompt)
    assert scores["temporal_smoothness"] < 0.5
    assert A.score_clip(video, meta.prompt)["temporal_smoothness"] > 0.9


def test_vanishing_subject_scores_low_on_consistency():
    video, meta = render_clip("a yellow square moves down", 2)
    vanishing = video.copy()
    vanishing[8:] = np.array(meta.background_rgb, dtype=np.uint8)  # subject gone after frame 8
    scores = A.score_clip(vanishing, meta.prompt)
    assert scores["subject_consistency"] < 0.1
    assert scores["colour"] == pytest.approx(0.5) and scores["shape"] == pytest.approx(0.5)


def test_empty_clip_scores_zero_without_errors():
    empty = np.full((16, 32, 32, 3), 100, dtype=np.uint8)
    scores = A.score_clip(empty, "a red circle moves left")
    for dim in ("colour", "shape", "motion", "subject_consistency", "dynamic_degree"):
        assert scores[dim] == 0.0, dim
    assert all(np.isfinite(v) and 0 <= v <= 1 for v in scores.values())


def test_float_and_torch_inputs_match_uint8(real):
    video, prompt, _ = real[0]
    expected = A.score_clip(video, prompt)
    for frames in (to_unit(video), torch.from_numpy(to_unit(video))):
        got = A.score_clip(frames, str(prompt))
        assert got.keys() == expected.keys()
        for k in got:
            assert got[k] == pytest.approx(expected[k], abs=1e-4), k


def test_scores_are_deterministic_and_bounded(real):
    video, prompt, _ = real[1]
    assert A.score_clip(video, prompt) == A.score_clip(video.copy(), prompt)
    for video, prompt, _ in real[:20]:
        assert all(0.0 <= s <= 1.0 for s in A.score_clip(video, prompt).values())


def test_aggregate_uses_vbench_weights():
    dims = {d: 0.8 for d in A.QUALITY_DIMS} | {d: 0.4 for d in A.SEMANTIC_DIMS}
    dims["sharpness"] = 0.3
    quality = (0.8 * (len(A.QUALITY_DIMS) - 1) + 0.3) / len(A.QUALITY_DIMS)
    out = A.aggregate(dims)
    assert out["quality"] == pytest.approx(quality)
    assert out["semantic"] == pytest.approx(0.4)
    assert out["total"] == pytest.approx((4 * quality + 1 * 0.4) / 5)
    assert (A.QUALITY_WEIGHT, A.SEMANTIC_WEIGHT) == (4.0, 1.0)
    with pytest.raises(UserError):
        A.aggregate({"colour": 1.0})


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="expected \\(T, H, W, 3\\)"):
        A.score_clip(np.zeros((32, 32, 3), np.uint8), "a red circle moves left")
    with pytest.raises(UserError, match="equal counts"):
        A.score_clips([np.zeros((4, 32, 32, 3), np.uint8)], [])
    with pytest.raises(UserError, match="unknown word"):
        A.score_clip(np.zeros((4, 32, 32, 3), np.uint8), "a purple circle moves left")


def test_analysers_are_fast(real):
    clips = real[:100]
    A.score_clip(*clips[0][:2])  # warm-up
    start = time.perf_counter()
    for video, prompt, _ in clips:
        A.score_clip(video, prompt)
    per_clip = (time.perf_counter() - start) / len(clips)
    # Target ≥ 200 clips/s on one free core (~3 ms measured); loose bound for a busy CI machine.
    assert per_clip < 0.02, f"{per_clip * 1e3:.1f} ms per clip"
