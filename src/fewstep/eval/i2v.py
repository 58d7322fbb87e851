"""VBench-I2V's video–image consistency in the toy world: ``i2v_subject`` and ``i2v_background``.

VBench-I2V (Huang et al., VBench++ 2024; ``vbench2_beta_i2v/i2v_subject.py``, ``i2v_background.py``)
embeds the condition image and every generated frame, takes ``conformity_t = max(0, cos(image, frame_t))``
and ``consecutive_t = max(0, cos(frame_{t−1}, frame_t))``, and scores a video

    i2v_subject     0.5·max_t conformity + 0.5·mean_t consecutive + 0.0·min_t consecutive   (DINO features)
    i2v_background  0.4·max_t conformity + 0.3·mean_t consecutive + 0.3·min_t consecutive   (DreamSim)

The toy world needs no learned embedding for either: the analysers (eval/analysers.py) separate the one
subject from the background exactly, so the similarities are measured on what each network stands for.

* subject (DINO's object identity, largely blind to where the object is): colour, size and shape of the
  subject — ``s = 1 − (size deviation + colour deviation + shape deviation) / CONSISTENCY_TOLERANCE``
  clipped to [0, 1], the deviations of :func:`~fewstep.eval.analysers.subject_consistency` between two
  frames (shape: the weighted distance of the shape descriptors); 0 when either frame has no subject.
  Position is left out as DINO's global feature leaves it out: a moving subject stays the same subject.
* background (DreamSim's whole-scene similarity, layout included): ``s = 1 − mean |I_a − I_b| / FLICKER_SCALE``
  over the background pixels of the reference frame ``a`` (outside its subject, dilated by one pixel),
  clipped to [0, 1]. For conformity the reference is the condition image, so a video whose scene — the
  background's level, tint and static noise, or the subject's start position — departs from the image
  loses; for consecutive frames, pixels of either frame's subject are left out (the rule of
  :func:`~fewstep.eval.analysers.background_flicker`), so motion itself costs nothing.

VBench-I2V groups them into its ``I2V score`` (their mean) and a total ``(quality + I2V score) / 2``;
:func:`i2v_summary` reports both as ``i2v`` and ``total_i2v`` next to the toy VBench ``total``, which stays
the text-to-video grouping so image- and text-conditioned models compare on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysers import _DESCRIPTOR_WEIGHTS, CONSISTENCY_TOLERANCE, FLICKER_SCALE, _descriptors, _dilate, extract_subject

I2V_DIMS: tuple[str, ...] = ("i2v_subject", "i2v_background")
#: (max conformity, mean consecutive, min consecutive) weights of VBench-I2V.
WEIGHTS = {"i2v_subject": (0.5, 0.5, 0.0), "i2v_background": (0.4, 0.3, 0.3)}


@dataclass(frozen=True)
class Frame:
    """One frame as the two similarities see it: its subject (appearance) and its background pixels."""

    levels: np.ndarray  # (H, W, 3) float32 levels 0..255
    present: bool
    area: float  # px
    colour: np.ndarray  # (3,) core colour
    contrast: float  # D of its clip, levels
    descriptors: np.ndarray  # (3,) shape descriptors
    foreground: np.ndarray  # (H, W) bool: the subject's hard mask dilated by one pixel


def frames_of(clip) -> list[Frame]:
    """The frames of a clip ``(T, H, W, 3)``, the subject extracted over the clip (eval/analysers.py)."""
    subject = extract_subject(clip)
    descriptors = _descriptors(subject.alpha)  # (T, 3)
    foreground = _dilate(subject.mask, 1)  # (T, H, W)
    return [Frame(subject.frames[t], bool(subject.present[t]), float(subject.area[t]), subject.colour[t],
                  subject.contrast, descriptors[t], foreground[t]) for t in range(len(subject.frames))]


def subject_similarity(a: Frame, b: Frame) -> float:
    """Appearance similarity in [0, 1] of the subjects of frames ``a`` and ``b`` (module doc)."""
    if not (a.present and b.present):
        return 0.0
    size_dev = abs(a.area - b.area) / max((a.area + b.area) / 2, 1e-6)
    colour_dev = np.linalg.norm(a.colour - b.colour) / max((a.contrast + b.contrast) / 2, 1e-6)
    shape_dev = np.linalg.norm(np.nan_to_num((a.descriptors - b.descriptors) * _DESCRIPTOR_WEIGHTS, nan=1.0))
    return float(np.clip(1.0 - (size_dev + colour_dev + shape_dev) / CONSISTENCY_TOLERANCE, 0.0, 1.0))


def background_similarity(a: Frame, b: Frame, exclude_b: bool) -> float:
    """Background similarity in [0, 1] of frame ``b`` to the reference frame ``a`` (module doc)."""
    keep = ~a.foreground & ~b.foreground if exclude_b else ~a.foreground  # (H, W)
    if not keep.any():
        return 0.0
    diff = np.abs(a.levels - b.levels).mean(axis=-1)  # (H, W) levels
    return float(np.clip(1.0 - diff[keep].mean() / FLICKER_SCALE, 0.0, 1.0))


SIMILARITY = {
    "i2v_subject": lambda a, b, consecutive: subject_similarity(a, b),
    "i2v_background": background_similarity,
}


def score_i2v_clip(image, frames) -> dict[str, float]:
    """``i2v_subject`` and ``i2v_background`` of one clip ``(T, H, W, 3)`` conditioned on ``image`` ``(H, W, 3)``
    (uint8, or float in [−1, 1]). The image's subject is extracted on its own (its own contrast), so a
    change of background alone does not read as a change of subject."""
    (cond,) = frames_of(np.asarray(image)[None])
    video = frames_of(np.asarray(frames))
    scores = {}
    for name, sim in SIMILARITY.items():
        conformity = [sim(cond, frame, False) for frame in video]
        consecutive = [sim(prev, frame, True) for prev, frame in zip(video, video[1:])] or [1.0]
        w_max, w_mean, w_min = WEIGHTS[name]
        scores[name] = float(w_max * max(conformity) + w_mean * np.mean(consecutive) + w_min * min(consecutive))
    return scores


def score_i2v_clips(images, clips) -> dict[str, float]:
    """Mean ``i2v_subject`` / ``i2v_background`` over clips ``(N, T, H, W, 3)`` and their images ``(N, H, W, 3)``."""
    per_clip = [score_i2v_clip(image, frames) for image, frames in zip(images, clips)]
    return {name: float(np.mean([s[name] for s in per_clip])) for name in I2V_DIMS}


def i2v_summary(dimensions: dict[str, float], quality: float) -> dict[str, float]:
    """VBench-I2V's ``I2V score`` (mean of the two dimensions) and its total ``(quality + I2V score) / 2``."""
    i2v = float(np.mean([dimensions[d] for d in I2V_DIMS]))
    return {"i2v": i2v, "total_i2v": (quality + i2v) / 2}
