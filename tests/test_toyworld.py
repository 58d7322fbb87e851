"""Toy-world generator: captions, determinism, geometry, splits and the dataset."""

import itertools

import numpy as np
import pytest
import torch

from fewstep.data import toyworld as tw
from fewstep.data.toyworld import (
    BACKGROUNDS,
    COLOURS,
    EVAL_PROMPTS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    VOCAB,
    Prompt,
    ToyWorld,
    eval_suite,
    format_prompt,
    parse_prompt,
    render_clip,
    sample_prompt,
    shape_coverage,
    split_of_seed,
    to_uint8,
    to_unit,
)
from fewstep.errors import UserError


# --- captions -------------------------------------------------------------------------------


def all_prompts():
    for colour, shape, motion, background in itertools.product(
        COLOURS, SHAPES, MOTIONS, (None, *BACKGROUNDS)
    ):
        speeds = (None,) if motion == "still" else (None, *SPEEDS)
        for speed in speeds:
            yield Prompt(colour, shape, motion, speed, background)


def test_parse_format_round_trip_over_the_whole_grammar():
    prompts = list(all_prompts())
    assert len(prompts) == 6 * 4 * (4 * 3 + 1) * 3
    for p in prompts:
        text = format_prompt(p.colour, p.shape, p.motion, p.speed, p.background)
        assert parse_prompt(text) == p
        assert str(p) == text


def test_canonical_captions():
    assert format_prompt("red", "circle", "left") == "a red circle moves left"
    assert format_prompt("blue", "cross", "still", None, "dark") == (
        "a blue cross stays still on a dark background"
    )
    assert format_prompt("white", "square", "up", "fast", "light") == (
        "a white square moves up quickly on a light background"
    )


def test_parse_is_case_and_whitespace_insensitive():
    p = parse_prompt("  A  Yellow\tTRIANGLE moves   down Slowly on a LIGHT background ")
    assert p == Prompt("yellow", "triangle", "down", "slow", "light")


def test_unknown_word_lists_the_vocabulary():
    with pytest.raises(UserError) as err:
        parse_prompt("a purple circle moves left")
    msg = str(err.value)
    assert "'purple'" in msg and "a purple circle moves left" in msg
    assert "vocabulary: " + ", ".join(VOCAB) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "a red circle moves",
        "red a circle moves left",
        "a circle red moves left",
        "a red circle moves still",
        "a red circle stays still quickly",
        "a red circle moves left on a dark",
        "a red circle moves left on a background background",
        "a red circle moves left quickly slowly",
        "a red circle moves left on a dark background quickly",
        "",
    ],
)
def test_malformed_prompt_is_a_one_line_user_error(text):
    with pytest.raises(UserError, match="malformed prompt") as err:
        parse_prompt(text)
    assert "\n" not in str(err.value)


def test_format_prompt_rejects_bad_values():
    with pytest.raises(UserError, match="colour 'purple'"):
        format_prompt("purple", "circle", "left")
    with pytest.raises(UserError, match="still clip"):
        format_prompt("red", "circle", "still", "fast")


def test_vocab_is_sorted_and_complete():
    assert VOCAB == sorted(set(VOCAB))
    words = set()
    for p in all_prompts():
        words |= set(str(p).split())
    assert words == set(VOCAB)


def test_sample_prompt_is_canonical_and_varied():
    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng) for _ in range(300)]
    for text in prompts:
        assert str(parse_prompt(text)) == text
    parsed = [parse_prompt(t) for t in prompts]
    assert {p.motion for p in parsed} == set(MOTIONS)
    assert {p.colour for p in parsed} == set(COLOURS)
    assert {p.shape for p in parsed} == set(SHAPES)
    assert any(p.speed is None and p.motion != "still" for p in parsed)
    assert any(p.speed is not None for p in parsed)
    assert any(p.background is None for p in parsed)
    assert any(p.background is not None for p in parsed)


# --- rendering -------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed():
    a, meta_a = render_clip("a green cross moves right", 7)
    b, meta_b = render_clip("a green cross moves right", 7)
    c, _ = render_clip("a green cross moves right", 8)
    assert a.shape == (tw.FRAMES, tw.SIZE, tw.SIZE, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes() and meta_a == meta_b
    assert not np.array_equal(a, c)


def test_render_does_not_touch_the_global_rng():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    render_clip("a red circle moves left", 1)
    assert np.random.random() == before


def test_within_prompt_variation():
    metas = [render_clip("a blue square moves up quickly", seed)[1] for seed in range(20)]
    assert len({m.start for m in metas}) == 20
    assert np.std([m.size_px for m in metas]) > 0.5
    assert np.std([m.speed_px for m in metas]) > 0.02
    assert len({m.colour_rgb for m in metas}) > 10
    assert len({m.background_rgb for m in metas}) > 10
    assert all(m.speed == "fast" for m in metas)


def test_open_attributes_are_sampled_and_recorded():
    metas = [render_clip("a white circle moves left", seed)[1] for seed in range(40)]
    assert {m.speed for m in metas} == set(SPEEDS)
    assert {m.background for m in metas} == set(BACKGROUNDS)
    still = render_clip("a red cross stays still", 0)[1]
    assert still.speed is None and still.speed_px == 0.0


def test_speed_classes_are_separated():
    slow = [render_clip("a red circle moves left slowly", s)[1].speed_px for s in range(30)]
    fast = [render_clip("a red circle moves left quickly", s)[1].speed_px for s in range(30)]
    assert max(slow) < min(fast)


def _coverage(meta, frames, size):
    dx, dy = tw.DIRECTIONS[meta.motion]
    t = np.arange(frames)[:, None]
    centres = np.array(meta.start)[None] + t * meta.speed_px * np.array([dx, dy])
    return shape_coverage(meta.shape, centres, meta.size_px, size)  # (T, H, W)


IDEAL_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # / s²


@pytest.mark.parametrize("frames,size", [(16, 32), (8, 48)])
def test_shapes_stay_inside_the_frame(frames, size):
    rng = np.random.default_rng(1)
    for seed in range(60):
        video, meta = render_clip(sample_prompt(rng), seed, frames=frames, size=size)
        a = _coverage(meta, frames, size)
        # Nothing on the outermost pixel ring, and the whole shape on every frame.
        ring = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], axis=1)
        assert ring.max() == 0.0
        ideal = IDEAL_AREA[meta.shape] * meta.size_px**2  # px², up to 4× supersampling error
        assert np.allclose(a.sum(axis=(1, 2)), ideal, rtol=0.1)
        # The rendered border pixels are background (up to the faint static noise).
        border = np.concatenate([video[:, 0], video[:, -1]], axis=1).astype(float)
        assert np.abs(border - np.array(meta.background_rgb)).max() <= 6


def test_rendered_video_is_the_composite_of_coverage_and_colours():
    video, meta = render_clip("a magenta triangle moves down on a light background", 3)
    a = _coverage(meta, tw.FRAMES, tw.SIZE)[..., None]
    expected = (1 - a) * np.array(meta.background_rgb) + a * np.array(meta.colour_rgb)
    assert np.abs(video - expected).max() <= 3 + 5 * meta.noise_std  # rounding + static noise


def test_centroid_moves_in_the_prompted_direction():
    for motion, (dx, dy) in tw.DIRECTIONS.items():
        text = format_prompt("yellow", "square", motion)
        video, meta = render_clip(text, 11)
        a = _coverage(meta, tw.FRAMES, tw.SIZE)
        ys, xs = np.mgrid[: tw.SIZE, : tw.SIZE]
        cx = (a * xs).sum(axis=(1, 2)) / a.sum(axis=(1, 2))
        cy = (a * ys).sum(axis=(1, 2)) / a.sum(axis=(1, 2))
        travel = meta.speed_px * (tw.FRAMES - 1)
        assert cx[-1] - cx[0] == pytest.approx(dx * travel, abs=0.1)
        assert cy[-1] - cy[0] == pytest.approx(dy * travel, abs=0.1)  # up = decreasing row


def test_every_colour_contrasts_with_every_background():
    for rgb, (name, (lo, hi)) in itertools.product(COLOURS.values(), tw.BACKGROUND_LEVELS.items()):
        worst = np.inf
        for shade, grey in itertools.product((-1, 1), (lo, hi)):
            colour = np.clip(np.array(rgb) + shade * tw.SHADE_JITTER, 0, 255)
            for tint in itertools.product((-1, 1), repeat=3):
                bg = grey + tw.BACKGROUND_TINT * np.array(tint)
                worst = min(worst, np.linalg.norm(colour - bg))
        assert worst > 100, (rgb, name, worst)


def test_render_rejects_bad_sizes():
    with pytest.raises(UserError, match="frames=1"):
        render_clip("a red circle moves left", 0, frames=1)
    with pytest.raises(UserError, match="size=8"):
        render_clip("a red circle moves left", 0, size=8)


# --- conversions, splits and dataset ----------------------------------------------------------


def test_unit_uint8_round_trip_numpy_and_torch():
    video, _ = render_clip("a red circle moves left", 0)
    unit = to_unit(video)
    assert unit.dtype == np.float32 and unit.min() >= -1 and unit.max() <= 1
    assert np.array_equal(to_uint8(unit), video)
    t = to_unit(torch.from_numpy(video))
    assert t.dtype == torch.float32
    assert torch.equal(to_uint8(t), torch.from_numpy(video))
    assert to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_train_and_eval_seeds_are_disjoint():
    train, evals = ToyWorld("train"), ToyWorld("eval")
    train_seeds = {train.prompt_and_seed(i)[1] for i in range(2000)}
    eval_seeds = {evals.prompt_and_seed(i)[1] for i in range(2000)}
    suite_seeds = {seed for _, seed in eval_suite(10)}
    assert len(train_seeds) == 2000 and len(eval_seeds) == 2000
    assert not train_seeds & eval_seeds and not train_seeds & suite_seeds
    assert {split_of_seed(s) for s in train_seeds} == {"train"}
    assert {split_of_seed(s) for s in eval_seeds | suite_seeds} == {"eval"}


def test_dataset_items_are_deterministic_and_in_range():
    ds = ToyWorld("train", frames=8, size=32, length=50)
    item = ds[3]
    assert item["frames"].shape == (8, 32, 32, 3) and item["frames"].dtype == torch.float32
    assert -1 <= item["frames"].min() and item["frames"].max() <= 1
    assert str(parse_prompt(item["prompt"])) == item["prompt"]
    again = ToyWorld("train", frames=8, size=32, length=50)[3]
    assert torch.equal(item["frames"], again["frames"]) and item["prompt"] == again["prompt"]
    video, _ = render_clip(item["prompt"], item["seed"], frames=8, size=32)
    assert torch.equal(item["frames"], torch.from_numpy(to_unit(video)))
    assert len(ds) == 50
    with pytest.raises(IndexError):
        ds[50]


def test_dataset_batch_and_dataloader():
    ds = ToyWorld("eval", length=10)
    batch = ds.batch([0, 1, 2])
    assert batch["frames"].shape == (3, tw.FRAMES, tw.SIZE, tw.SIZE, 3)
    assert batch["prompts"] == [ds[i]["prompt"] for i in range(3)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    first = next(iter(loader))
    assert torch.equal(first["frames"][:3], batch["frames"])


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="split 'test'"):
        ToyWorld("test")


def test_eval_prompts_cover_the_vocabulary():
    parsed = [parse_prompt(p) for p in EVAL_PROMPTS]
    assert [str(p) for p in parsed] == EVAL_PROMPTS
    assert len(set(EVAL_PROMPTS)) == len(EVAL_PROMPTS) >= 20
    assert {p.colour for p in parsed} == set(COLOURS)
    assert {p.shape for p in parsed} == set(SHAPES)
    assert {p.motion for p in parsed} == set(MOTIONS)
    assert {p.background for p in parsed} >= set(BACKGROUNDS)
    assert {p.speed for p in parsed} >= set(SPEEDS)


def test_eval_suite_is_fixed_and_sized():
    suite = eval_suite(3)
    assert len(suite) == 3 * len(EVAL_PROMPTS)
    assert suite == eval_suite(3)
    assert eval_suite(2) == [pair for i, pair in enumerate(suite) if i % 3 < 2]
    assert len({seed for _, seed in suite}) == len(suite)
    with pytest.raises(UserError):
        eval_suite(0)


def test_small_frames_keep_every_clip_renderable():
    """At 16 px the largest shape plus the longest travel does not fit: travel is shortened."""
    from fewstep.data.toyworld import ToyWorld

    world = ToyWorld("train", frames=8, size=16)
    for i in range(200):
        clip = world[i]["frames"]
        assert clip.shape == (8, 16, 16, 3)
