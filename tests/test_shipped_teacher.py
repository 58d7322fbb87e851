"""The shipped ``toy-teacher`` (``fewstep pretrain``'s export): it loads by name and draws the
colour and motion direction a prompt asks for, judged by the pixel analysers. (Shapes are its weak
dimension — shape score 0.49 at 50 steps on the eval suite — so they are measured by ``fewstep
eval``, not asserted here.)"""

import numpy as np
import pytest

from fewstep.data.toyworld import parse_prompt
from fewstep.eval.analysers import extract_subject, motion_direction, nearest_colour
from fewstep.models.pipeline import VideoPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

#: (prompt, seed): fixed prompts covering four colours, both backgrounds and all four directions.
CASES = [("a red circle moves left", 0), ("a blue square moves up on a dark background", 1),
         ("a yellow triangle moves right", 2), ("a green cross moves down on a light background", 3)]


@pytest.fixture(scope="module")
def teacher_videos():
    pipe = VideoPipeline.load("toy-teacher")
    prompts = [p for p, _ in CASES]
    videos = []
    for prompt, seed in CASES:  # each prompt with its own seed, the model's own sampler (50 Euler steps, CFG)
        frames, result = pipe.generate([prompt], seed=seed)
        videos.append(frames[0])
    assert result.nfe == 2 * pipe.config.sampling.steps  # CFG: two evaluations per step
    return prompts, videos


def test_shipped_teacher_geometry():
    pipe = VideoPipeline.load("toy-teacher")
    assert pipe.config.frames == 16 and pipe.config.size == 32
    assert pipe.config.sampling.steps == 50 and pipe.config.sampling.cfg_scale and pipe.config.sampling.cfg_scale > 1


def test_shipped_teacher_draws_the_prompted_colour_and_direction(teacher_videos):
    prompts, videos = teacher_videos
    for prompt, video in zip(prompts, videos):
        want = parse_prompt(prompt)
        subject = extract_subject(video)
        colours = [c for c in nearest_colour(subject.colour) if c is not None]
        assert len(colours) >= 12 and np.mean([c == want.colour for c in colours]) >= 0.9, (prompt, colours)
        assert motion_direction(subject) == want.motion, prompt
