"""The toy world: seeded procedural captioned video clips (DESIGN §4).

Every clip is one solid-colour shape moving over a near-uniform grey background::

    a {colour} {shape} moves {left|right|up|down} [quickly|slowly] [on a {dark|light} background]
    a {colour} {shape} stays still [on a {dark|light} background]

A caption fixes the *class* of the clip; the seed fixes everything else (start position, shape
size, speed within its class, shade of the shape and of the background, faint static background
noise), so that within-prompt diversity — and its collapse in a distilled student — is
measurable. Because every attribute is drawn from a known distribution, `fewstep.eval.analysers`
can judge any video, from any model, from its pixels alone.

Geometry, in pixel units of the output frame (image row ``y`` grows *downward*, so "up" means
decreasing ``y``):

- a shape of size ``s`` (its bounding extent) centred at ``c_t = c_0 + t · v · d``, with ``d``
  the unit direction and ``v`` the speed in px/frame;
- ``s ~ U(0.25, 0.36) · size``; a clip travels ``v · (frames − 1) ~ U(0.12, 0.22) · size``
  (slow) or ``U(0.40, 0.55) · size`` (fast); ``c_0`` is drawn so that the shape stays
  ``MARGIN_PX`` inside the frame on every frame;
- coverage ``a(x, y) ∈ [0, 1]`` is rendered anti-aliased (4×4 supersampling, box downsample)
  and composited as ``frame = (1 − a) · background + a · colour``.

Frames are ``(T, H, W, 3)`` uint8 on disk and float32 in ``[−1, 1]`` in memory (DESIGN §2).
All randomness comes from ``np.random.default_rng(seed)``; nothing touches a global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewstep.errors import UserError
from fewstep.utils.frames import to_uint8, to_unit  # noqa: F401  (re-exported: the toy world's pixel format)

FRAMES = 16  # default clip length T
SIZE = 32  # default frame height = width, px

# --- vocabulary ------------------------------------------------------------------------------

# Palette (RGB). Every pair with either background keeps a colour distance > 100 even at the
# extremes of the shade jitter, and the palette colours are > 150 apart from each other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "magenta": (220, 50, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
SPEEDS: tuple[str, ...] = ("slow", "fast")
BACKGROUNDS: tuple[str, ...] = ("dark", "light")

SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}  # speed class -> caption adverb
_WORD_SPEEDS = {word: speed for speed, word in SPEED_WORDS.items()}

# Unit direction (dx, dy) per motion; image y grows downward so "up" is dy = -1.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}

_GRAMMAR_WORDS = ("a", "moves", "stays", "still", "on", "background")
VOCAB: list[str] = sorted(
    set(_GRAMMAR_WORDS) | set(COLOURS) | set(SHAPES) | set(MOTIONS) | set(BACKGROUNDS)
    | set(SPEED_WORDS.values())
)
_GRAMMAR = (
    "'a {colour} {shape} moves {left|right|up|down} [quickly|slowly] [on a {dark|light} "
    "background]' or 'a {colour} {shape} stays still [on a {dark|light} background]'"
)

# --- generator distributions (fractions of the frame size unless stated) ---------------------

SHAPE_SIZE_RANGE = (0.25, 0.36)  # bounding extent s / size
TRAVEL_RANGE = {"slow": (0.12, 0.22), "fast": (0.40, 0.55)}  # distance over the clip / size
CROSS_ARM = 1.0 / 3.0  # cross arm width / s
MARGIN_PX = 1.0  # the shape stays this far inside the frame on every frame
SHADE_JITTER = 12  # per-channel uniform jitter of the shape colour, ± levels
BACKGROUND_LEVELS = {"dark": (20.0, 40.0), "light": (150.0, 170.0)}  # base grey level range
BACKGROUND_TINT = 3.0  # per-channel jitter around the base grey, ± levels
BACKGROUND_NOISE_STD = 1.0  # std of the faint *static* background noise, levels
BACKGROUND_NOISE_PROB = 0.5  # fraction of clips that carry that noise
SUPERSAMPLE = 4  # anti-aliasing factor per axis


@dataclass(frozen=True)
class Prompt:
    """A parsed caption. ``speed`` and ``background`` are None when the caption leaves them open
    (they are then sampled per clip); ``speed`` is always None for ``motion == "still"``."""

    colour: str
    shape: str
    motion: str
    speed: str | None = None
    background: str | None = None

    def __str__(self) -> str:
        return format_prompt(self.colour, self.shape, self.motion, self.speed, self.background)


@dataclass(frozen=True)
class ClipMeta:
    """The attributes a rendered clip realises (all lengths in px of the output frame)."""

    prompt: Prompt
    colour_rgb: tuple[int, int, int]  # shape colour after shade jitter
    shape: str
    motion: str
    speed: str | None  # resolved speed class (None for still clips)
    speed_px: float  # px / frame (0 for still clips)
    size_px: float  # bounding extent s of the shape
    start: tuple[float, float]  # centre (x, y) on frame 0
    background: str  # resolved background class
    background_rgb: tuple[int, int, int]  # base background colour (before static noise)
    noise_std: float  # std of the static background noise (0 when absent)


# --- captions ----------------------------------------------------------------------------------


def format_prompt(
    colour: str, shape: str, motion: str, speed: str | None = None, background: str | None = None
) -> str:
    """The canonical caption of a clip class (see the module docstring for the grammar)."""
    _check_choice("colour", colour, tuple(COLOURS))
    _check_choice("shape", shape, SHAPES)
    _check_choice("motion", motion, MOTIONS)
    if speed is not None:
        _check_choice("speed", speed, SPEEDS)
        if motion == "still":
            raise UserError(f"speed={speed!r} given for a still clip; expected speed=None")
    if background is not None:
        _check_choice("background", background, BACKGROUNDS)

    words = ["a", colour, shape]
    words += ["stays", "still"] if motion == "still" else ["moves", motion]
    if speed is not None:
        words.append(SPEED_WORDS[speed])
    if background is not None:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def parse_prompt(prompt: str | Prompt) -> Prompt:
    """Parse a caption (case- and whitespace-insensitive) into a :class:`Prompt`.

    Raises UserError naming the first unknown word (and listing the vocabulary), or naming the
    grammar when the words are known but their order is not.
    """
    if isinstance(prompt, Prompt):
        return prompt
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().split()
    for word in words:
        if word not in VOCAB:
            raise UserError(
                f"unknown word {word!r} in prompt {prompt!r}; vocabulary: {', '.join(VOCAB)}"
            )

    malformed = UserError(f"malformed prompt {prompt!r}; expected {_GRAMMAR}")
    # Phase 1: "a {colour} {shape}".
    if len(words) < 5 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise malformed
    colour, shape, rest = words[1], words[2], words[3:]
    # Phase 2: "moves {direction} [adverb]" or "stays still".
    speed = None
    if rest[:2] == ["stays", "still"]:
        motion, rest = "still", rest[2:]
    elif rest[0] == "moves" and rest[1] in DIRECTIONS and rest[1] != "still":
        motion, rest = rest[1], rest[2:]
        if rest and rest[0] in _WORD_SPEEDS:
            speed, rest = _WORD_SPEEDS[rest[0]], rest[1:]
    else:
        raise malformed
    # Phase 3: "[on a {dark|light} background]".
    background = None
    is_suffix = len(rest) == 4 and rest[:2] == ["on", "a"] and rest[3] == "background"
    if is_suffix and rest[2] in BACKGROUNDS:
        background, rest = rest[2], []
    if rest:
        raise malformed
    return Prompt(colour, shape, motion, speed, background)


def sample_prompt(rng: np.random.Generator) -> str:
    """A random canonical caption; half the moving ones name a speed, half of all a background."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    motion = str(rng.choice(MOTIONS))
    speed = None
    if motion != "still" and rng.random() < 0.5:
        speed = str(rng.choice(SPEEDS))
    background = str(rng.choice(BACKGROUNDS)) if rng.random() < 0.5 else None
    return format_prompt(colour, shape, motion, speed, background)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


# --- rendering ---------------------------------------------------------------------------------


def shape_coverage(
    shape: str, centres: np.ndarray, s: float, size: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Anti-aliased coverage a ∈ [0, 1] of ``shape`` (extent ``s``) at each centre.

    ``centres`` is ``(T, 2)`` holding (x, y) in px; returns ``(T, size, size)``. Each output
    pixel is the mean of ``supersample²`` point samples at sub-pixel centres (box filter).
    Shapes: circle of diameter s; axis-aligned square of side s; isosceles triangle with apex up,
    base s and height s; cross of two s × (s/3) bars.
    """
    n = size * supersample
    grid = (np.arange(n, dtype=np.float32) + 0.5) / supersample  # sample centres, px
    dx = grid[None, None, :] - centres[:, 0, None, None].astype(np.float32)  # (T, 1, n)
    dy = grid[None, :, None] - centres[:, 1, None, None].astype(np.float32)  # (T, n, 1)
    half = s / 2.0
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        depth = dy + half  # distance below the apex row
        inside = (depth >= 0) & (depth <= s) & (np.abs(dx) <= depth / 2.0)
    elif shape == "cross":
        arm = s * CROSS_ARM / 2.0
        inside = ((np.abs(dx) <= half) & (np.abs(dy) <= arm)) | (
            (np.abs(dx) <= arm) & (np.abs(dy) <= half)
        )
    else:
        raise UserError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    inside = np.broadcast_to(inside, (len(centres), n, n)).astype(np.float32)  # (T, n, n)
    # Box downsample: (T, n, n) -> (T, size, k, size, k) -> mean over the k × k block.
    blocks = inside.reshape(len(centres), size, supersample, size, supersample)
    return blocks.mean(axis=(2, 4))  # (T, size, size)


def render_clip(
    prompt: Prompt | str, seed: int, frames: int = FRAMES, size: int = SIZE
) -> tuple[np.ndarray, ClipMeta]:
    """Render one clip of ``prompt``; deterministic per (prompt, seed, frames, size).

    Returns ``(video, meta)`` with ``video`` a ``(frames, size, size, 3)`` uint8 array.
    """
    prompt = parse_prompt(prompt)
    if not isinstance(frames, int) or frames < 2:
        raise UserError(f"frames={frames!r} is invalid; expected an integer >= 2")
    if not isinstance(size, int) or size < 16:
        raise UserError(f"size={size!r} is invalid; expected an integer >= 16 (px)")
    rng = np.random.default_rng(seed)

    # 1. Resolve the open attributes of the caption.
    speed = prompt.speed
    if prompt.motion != "still" and speed is None:
        speed = str(rng.choice(SPEEDS))
    background = prompt.background or str(rng.choice(BACKGROUNDS))

    # 2. Shape size, speed and a start position that keeps the whole path inside the frame.
    s = float(rng.uniform(*SHAPE_SIZE_RANGE) * size)
    travel = float(rng.uniform(*TRAVEL_RANGE[speed]) * size) if speed is not None else 0.0
    dx, dy = DIRECTIONS[prompt.motion]
    lo = MARGIN_PX + s / 2.0  # lowest admissible centre coordinate
    hi = size - MARGIN_PX - s / 2.0  # highest admissible centre coordinate
    # small frames (< 32 px) cannot always hold the largest shape plus the longest travel:
    # shorten the travel there (never the case at the default 32 px)
    travel = min(travel, 0.999 * (hi - lo))
    speed_px = travel / (frames - 1)
    start = []
    for d in (dx, dy):  # per axis: moving axes keep room for the travel ahead
        first = lo + travel if d < 0 else lo
        last = hi - travel if d > 0 else hi
        start.append(float(rng.uniform(first, last)))
    t = np.arange(frames, dtype=np.float64)
    centres = np.array(start)[None, :] + t[:, None] * speed_px * np.array([dx, dy])  # (T, 2)

    # 3. Colours: shape shade and background grey with tiny tint, optional static noise.
    base = np.array(COLOURS[prompt.colour], dtype=np.float64)
    colour = np.clip(base + rng.uniform(-SHADE_JITTER, SHADE_JITTER, size=3), 0, 255).round()
    grey = rng.uniform(*BACKGROUND_LEVELS[background])
    bg_rgb = np.clip(grey + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3), 0, 255).round()
    noise_std = BACKGROUND_NOISE_STD if rng.random() < BACKGROUND_NOISE_PROB else 0.0
    noise = rng.normal(0.0, noise_std, size=(size, size, 1)) if noise_std else 0.0  # (H, W, 1)
    background_img = bg_rgb[None, None, :] + noise  # (H, W, 3), identical on every frame

    # 4. Composite: frame = (1 − a) · background + a · colour.
    a = shape_coverage(prompt.shape, centres, s, size)[..., None].astype(np.float64)  # (T,H,W,1)
    video = (1.0 - a) * background_img[None] + a * colour[None, None, None, :]  # (T, H, W, 3)
    video = np.clip(video.round(), 0, 255).astype(np.uint8)

    meta = ClipMeta(
        prompt=prompt,
        colour_rgb=tuple(int(c) for c in colour),
        shape=prompt.shape,
        motion=prompt.motion,
        speed=speed,
        speed_px=speed_px,
        size_px=s,
        start=(start[0], start[1]),
        background=background,
        background_rgb=tuple(int(c) for c in bg_rgb),
        noise_std=noise_std,
    )
    return video, meta


# --- seeds, dataset and evaluation suite ------------------------------------------------------

SPLITS = {"train": 0, "eval": 1}
_SEED_BITS = 62  # a seed is (split_id << 62) | 62 hashed bits, so splits never share a seed


def _split_seed(split_id: int, entropy: list[int]) -> int:
    """A render seed inside the namespace of ``split_id``, hashed from ``entropy``."""
    (word,) = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return (split_id << _SEED_BITS) | (int(word) & ((1 << _SEED_BITS) - 1))


def split_of_seed(seed: int) -> str:
    """The split a seed produced by this module belongs to."""
    split_id = seed >> _SEED_BITS
    return {v: k for k, v in SPLITS.items()}[split_id]


class ToyWorld(torch.utils.data.Dataset):
    """Map-style dataset of toy clips; item ``i`` is a pure function of ``(split, i)``.

    The caption is sampled from ``SeedSequence([split_id, i])`` and the render seed is hashed from
    the same sequence into the split's seed namespace (train and eval seeds are disjoint).
    Items: ``dict(frames=(T, H, W, 3) float32 tensor in [−1, 1], prompt=str, seed=int)``.
    """

    def __init__(
        self, split: str = "train", frames: int = FRAMES, size: int = SIZE, length: int = 100_000
    ):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if length < 1:
            raise UserError(f"length={length} is invalid; expected a positive number of clips")
        self.split, self.frames, self.size, self.length = split, frames, size, length
        self.split_id = SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def prompt_and_seed(self, index: int) -> tuple[str, int]:
        """The caption and render seed of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ToyWorld of length {self.length}")
        rng = np.random.default_rng(np.random.SeedSequence([self.split_id, index]))
        prompt = sample_prompt(rng)
        seed = _split_seed(self.split_id, [self.split_id, index, int(rng.integers(2**31))])
        return prompt, seed

    def __getitem__(self, index: int) -> dict:
        prompt, seed = self.prompt_and_seed(int(index))
        video, _ = render_clip(prompt, seed, self.frames, self.size)  # (T, H, W, 3) uint8
        return {"frames": torch.from_numpy(to_unit(video)), "prompt": prompt, "seed": seed}

    def batch(self, indices) -> dict:
        """Items stacked: ``frames`` (B, T, H, W, 3) float32 tensor, ``prompts`` list, ``seeds``."""
        items = [self[i] for i in indices]
        return {
            "frames": torch.stack([item["frames"] for item in items]),  # (B, T, H, W, 3)
            "prompts": [item["prompt"] for item in items],
            "seeds": [item["seed"] for item in items],
        }


# Fixed evaluation captions: every colour, shape and motion (including "stays still"), both
# speeds and both backgrounds, with and without the optional suffixes.
EVAL_PROMPTS: list[str] = [
    "a red circle moves left",
    "a green square moves right quickly",
    "a blue triangle moves up on a dark background",
    "a yellow cross moves down slowly on a light background",
    "a white circle stays still",
    "a magenta square moves left quickly on a light background",
    "a red triangle moves right slowly",
    "a green cross stays still on a dark background",
    "a blue circle moves down quickly",
    "a yellow square moves up on a light background",
    "a white triangle moves left on a dark background",
    "a magenta cross moves right",
    "a red square stays still on a light background",
    "a green triangle moves down",
    "a blue cross moves left slowly on a dark background",
    "a yellow circle moves right quickly on a dark background",
    "a white square moves down slowly on a light background",
    "a magenta circle moves up quickly",
    "a red cross moves up slowly on a dark background",
    "a green circle moves left on a light background",
    "a blue square stays still on a light background",
    "a yellow triangle stays still",
    "a white cross moves right quickly on a light background",
    "a magenta triangle moves down on a dark background",
]


def eval_suite(num_per_prompt: int) -> list[tuple[str, int]]:
    """``(prompt, seed)`` pairs: ``num_per_prompt`` eval-namespace seeds for each EVAL_PROMPTS."""
    if not isinstance(num_per_prompt, int) or num_per_prompt < 1:
        raise UserError(f"num_per_prompt={num_per_prompt!r} is invalid; expected an integer >= 1")
    eval_id = SPLITS["eval"]
    suite_tag = 2**31 - 1  # keeps these entropies apart from the eval dataset's [1, index]
    return [
        (prompt, _split_seed(eval_id, [eval_id, suite_tag, p, j]))
        for p, prompt in enumerate(EVAL_PROMPTS)
        for j in range(num_per_prompt)
    ]


def condition_seed(prompt: str, index: int = 0) -> int:
    """Render seed of the ``index``-th conditioning clip of ``prompt`` (eval namespace; a pure function of the
    caption text, so every model evaluated or sampled on a caption is conditioned on the same frames)."""
    eval_id = SPLITS["eval"]
    condition_tag = 2**31 - 2  # apart from eval_suite's tag and the eval dataset's [1, index]
    return _split_seed(eval_id, [eval_id, condition_tag, index, *str(prompt).encode()])


def condition_frame(prompt: str, index: int = 0, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """The first frame ``(size, size, 3)`` uint8 of the ``index``-th conditioning clip of ``prompt``: what an
    image-to-video model is conditioned on for that caption (``--image toy:CAPTION``, the I2V evaluation)."""
    video, _ = render_clip(prompt, condition_seed(prompt, index), frames, size)  # (T, H, W, 3)
    return video[0]
