"""``fewstep bench``: how much faster the student is, and how much memory the latent reward saves.

**Speed** (DOLLAR §4.1's speed-up; AccVideo's). The student at each of its step counts and the
teacher at ``teacher_steps`` with its CFG generate the same prompts from the same initial noise,
interleaved ``repeats`` times (so background load affects all alike); the median is reported for

* ``sampling``  the denoising loop alone (what the number of network evaluations governs), and
* ``end_to_end``  sampling + decoding to frames (the codec's cost is the same for every model,
  so this ratio is the smaller one).

``speedup = teacher seconds / student seconds`` and ``nfe_ratio = teacher NFE / student NFE``
(CFG counts two evaluations per step, so 50 CFG steps against 4 steps is 25×).

The batch (``num_videos``, default 32 — the batch ``fewstep eval`` and ``generate`` sample in) sets
how close the wall-clock ratio comes to the NFE ratio: the teacher's CFG step is one forward of
the doubled batch, which on a CPU costs 1.9× a single-batch forward at 8 videos (2 cores; the
4-step speed-up is then 22–23×) but 2.2× at 32 (25–28×).

**Memory** (DOLLAR §3.3: the latent reward model keeps the decoder out of the graph). The
student's reward fine-tuning, ``x̂ = G_θ(ε)`` on the student's grid then ``−R(x̂).mean()`` and
backward, with the reward computed two ways:

* ``lrm``    ``R = R^l_φ(x̂)`` — the latent reward model (DOLLAR Eq. 15);
* ``pixel``  ``R = R_pix(Dec(x̂))`` — a differentiable pixel reward through the decoder (the
  direct reward fine-tuning DOLLAR's LRM replaces).

Two scopes are measured: ``reward`` — the reward gradient ``∂R/∂x̂`` alone (forward and backward
of what differs between the two; ``x̂`` is a leaf), and ``step`` — the whole fine-tuning step
including the student's few-step generation graph (``backprop``: ``all`` steps or the ``last``),
which is the same in both and, for a toy student, the larger part.

Peak memory is the high-water mark of memory allocated during the step above what was allocated
before it: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU, the running sum of the
allocator's allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .data.toyworld import EVAL_PROMPTS
from .diffusion.samplers import sample_consistency
from .errors import UserError
from .rewards import build_reward
from .rewards.latent import LatentRewardModelConfig, build_lrm


@dataclass
class Timing:
    sampling: float  # seconds per video, median over repeats
    end_to_end: float
    nfe: int


def _clock(device: torch.device) -> float:
    """``perf_counter`` after the device's queued work has finished (CUDA launches asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _time_model(pipe, prompts, steps, cfg_scale, noise, images=None) -> tuple[float, float, int]:
    device = next(pipe.parameters()).device
    noise = noise.to(device)  # the copy is not timed
    visual = {} if images is None else {"images": images.to(device)}
    start = _clock(device)
    result = pipe.sample_latents(prompts, steps=steps, cfg_scale=cfg_scale, noise=noise, **visual)
    sampled = _clock(device)
    pipe.decode(result.x)
    done = _clock(device)
    return sampled - start, done - start, result.nfe


def bench_speed(student, teacher, *, student_steps=(4, 2, 1), teacher_steps: int = 50, num_videos: int = 32,
                repeats: int = 3, seed: int = 0) -> dict:
    """Seconds per video and NFE of the teacher and of the student at each step count (module doc). An
    image-to-video pair samples each prompt on the first frame of its toy clip, as ``fewstep eval`` does (the
    image's encoding is timed with the sampling, alike for both)."""
    from .eval.runner import condition_frames
    from .utils.frames import to_unit

    if student.image_conditioned != teacher.image_conditioned:
        raise UserError("the student and the teacher differ in conditioning (one is image-to-video, the other "
                        "text-to-video); bench a student against its own teacher")
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(num_videos)]
    noise = torch.randn(teacher.latent_shape(num_videos), generator=torch.Generator().manual_seed(seed))
    images = (torch.from_numpy(to_unit(condition_frames(teacher, prompts, 1))) if teacher.image_conditioned
              else None)  # (N, H, W, 3) in [−1, 1]
    runs = [("teacher", teacher, teacher_steps, None), *((f"student/{n}", student, n, None) for n in student_steps)]
    for _, pipe, _, cfg in runs:  # warm-up (allocator, kernels), untimed
        _time_model(pipe, prompts[:1], 1, cfg, noise[:1], None if images is None else images[:1])
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name, *_ in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, pipe, steps, cfg in runs:
                samples[name].append(_time_model(pipe, prompts, steps, cfg, noise, images))
    timings = {name: Timing(statistics.median(s[0] for s in rows) / num_videos,
                            statistics.median(s[1] for s in rows) / num_videos, rows[0][2])
               for name, rows in samples.items()}
    ref = timings["teacher"]
    out = {"teacher": {"steps": teacher_steps, "cfg_scale": teacher.sampling.cfg_scale,
                       "seconds_per_video": {"sampling": ref.sampling, "end_to_end": ref.end_to_end},
                       "nfe": ref.nfe},
           "students": {}, "num_videos": num_videos, "repeats": repeats}
    for n in student_steps:
        t = timings[f"student/{n}"]
        out["students"][str(n)] = {
            "steps": n, "nfe": t.nfe, "nfe_ratio": ref.nfe / t.nfe,
            "seconds_per_video": {"sampling": t.sampling, "end_to_end": t.end_to_end},
            "speedup": {"sampling": ref.sampling / t.sampling, "end_to_end": ref.end_to_end / t.end_to_end},
        }
    return out


@contextlib.contextmanager
def _native_stderr_silenced():
    """Mute file descriptor 2 (the profiler's C++ start/stop log lines); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device: torch.device) -> int:
    """Bytes allocated at the high-water mark of ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an allocation is reported by the innermost op that made it (its *self* usage), a free as a
    # "[memory]" event; their running sum in time order is the memory allocated at each moment
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def bench_reward_memory(student, *, lrm=None, reward: str = "toy-clip", batch_size: int = 8, steps: int = 4,
                        backprop: str = "last", seed: int = 0) -> dict:
    """Peak memory of one LRM fine-tune step vs one pixel-reward step through the decoder (module doc)."""
    device = next(student.parameters()).device
    pixel_reward = build_reward(reward).to(device).requires_grad_(False)
    if not pixel_reward.differentiable:
        raise UserError(f"--reward {reward}: the pixel-reward step needs a differentiable reward")
    if lrm is None:  # DOLLAR App. 7.2 Table 12 image LRM, averaged over frames (dollar.yaml's)
        lrm = build_lrm(LatentRewardModelConfig(width=64, groups=16, kernel_size=3, stride=1),
                        student.latent_shape(1)[1])
    lrm = lrm.to(device)
    denoiser = student.denoiser.requires_grad_(True)
    prompts = [EVAL_PROMPTS[i % len(EVAL_PROMPTS)] for i in range(batch_size)]
    with torch.no_grad():
        cond = student.encode_prompts(prompts)  # the frozen text encoder is outside the step
    times = student.sampling_times(steps)  # (K + 1,) the student's times, then 0
    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(student.latent_shape(batch_size), generator=gen).to(device) for _ in range(len(times) - 1)]

    def generate(grad_steps=None):  # G_θ(ε) by consistency sampling (the DOLLAR student's generator)
        renoise = [*noises[1:], torch.zeros_like(noises[0])]
        return sample_consistency(denoiser, noises[0], times, cond, noises=renoise, grad_steps=grad_steps)

    def step(kind: str, scope: str):
        def run():
            if scope == "step":
                x0 = generate(None if backprop == "all" else [-1]).x
            else:  # the reward gradient alone: x̂ is a leaf
                with torch.no_grad():
                    x0 = generate().x
                x0.requires_grad_(True)
            r = lrm(x0, cond) if kind == "lrm" else pixel_reward(student.decode(x0), prompts)  # (B,)
            (-r.mean()).backward()
        return run

    results = {}
    for scope in ("reward", "step"):
        for kind in ("lrm", "pixel"):
            step(kind, scope)()  # warm-up
            denoiser.zero_grad(set_to_none=True)
            lrm.zero_grad(set_to_none=True)
            results[scope, kind] = peak_memory(step(kind, scope), device)
            denoiser.zero_grad(set_to_none=True)
            lrm.zero_grad(set_to_none=True)
    denoiser.requires_grad_(False)
    out = {"batch_size": batch_size, "steps": len(times) - 1, "backprop": backprop, "reward": reward,
           "device": str(device)}
    for scope in ("reward", "step"):
        lrm_bytes, pixel_bytes = results[scope, "lrm"], results[scope, "pixel"]
        out[scope] = {"lrm_bytes": lrm_bytes, "pixel_bytes": pixel_bytes, "ratio": lrm_bytes / max(pixel_bytes, 1)}
    return out
