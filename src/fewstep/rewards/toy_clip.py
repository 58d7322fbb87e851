"""The toy world's contrastive caption scorer ("toy CLIP"): frame–caption and clip–caption heads.

RGTD scores the first/middle/last frames with an image–text reward (RGTD Eq. 13) and the whole
clip with a video–text reward (RGTD Eq. 14). The toy CLIP provides both from one model::

    frames (B, T, H, W, 3) ──2D conv per frame──▶ h (B, T, F) ──▶ frame embeddings e_t (B, T, E)
                                              └──temporal convs over t──▶ clip embedding  v (B, E)
    caption ──ToyTextEncoder──masked mean──▶ two projections ──▶ u_frame (E,), u_clip (E,)

All embeddings are L2-normalised; similarities are cosines. The frame encoder keeps the spatial
layout (it flattens its last 4×4 feature map instead of pooling it), so the temporal head can
read the subject's position over time and hence its motion and speed.

Training (:func:`train_toy_clip`) is symmetric InfoNCE (CLIP, Radford et al. 2021) with a
learnable temperature per head, on batches of toy-world clips. A batch may hold several clips a
caption describes (captions leave speed and background open, and a frame cannot show motion),
so the targets are *soft*: uniform over every clip (caption) that satisfies the caption (clip),
judged from the attributes the clips realise. The frame head counts appearance only (colour,
shape, background), the clip head every attribute.

Reward (:class:`ToyClipReward`, differentiable): ``frame`` = mean over the first/middle/last
frames of cos(e_t, u_frame); ``clip`` = cos(v, u_clip); ``both`` = their mean. Clips of another
length or size are resampled (trilinear, differentiable) to the model's own ``frames × size²``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from fewstep.config import StrictModel
from fewstep.data.toyworld import FRAMES, MOTIONS, SIZE, VOCAB, Prompt, eval_suite, parse_prompt
from fewstep.models.text_encoder import ToyTextEncoder, ToyTextEncoderConfig

from .base import Reward, check_frames, load_asset, resolve_asset, save_asset
from .training_data import LabelledClips, caption_matches

SHIPPED_NAME = "toy-clip"
Head = Literal["frame", "clip", "both"]
Progress = Callable[[int, int, dict], None]  # (step, steps, metrics)


def _default_text() -> ToyTextEncoderConfig:
    return ToyTextEncoderConfig(vocab=VOCAB, dim=64, depth=2, heads=4)


class ToyClipConfig(StrictModel):
    """Architecture of the toy CLIP (the clip geometry it was trained on included)."""

    frames: int = Field(FRAMES, ge=2, description="clip length T the video encoder expects")
    size: int = Field(SIZE, ge=8, description="frame height = width the video encoder expects, px")
    channels: list[int] = Field([24, 48, 64], description="one stride-2 conv stage each")
    frame_dim: int = 128  # per-frame feature width F
    temporal_dim: int = 128  # width of the temporal head
    embed_dim: int = 64  # joint embedding width E
    text: ToyTextEncoderConfig = Field(default_factory=_default_text)
    init_temperature: float = Field(0.07, gt=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ToyClipConfig:
        if not self.channels or self.size % (2 ** len(self.channels)):
            raise ValueError(f"size {self.size} must be divisible by 2^len(channels) = {2 ** len(self.channels)}")
        return self


def resample(frames: Tensor, frames_out: int, size_out: int) -> Tensor:
    """``(B, T, H, W, 3)`` → ``(B, frames_out, size_out, size_out, 3)`` (trilinear; identity if equal)."""
    B, T, H, W, _ = frames.shape
    if (T, H, W) == (frames_out, size_out, size_out):
        return frames
    x = rearrange(frames, "b t h w c -> b c t h w")
    x = F.interpolate(x, size=(frames_out, size_out, size_out), mode="trilinear", align_corners=False)
    return rearrange(x, "b c t h w -> b t h w c")


class ToyClip(nn.Module):
    """Video/frame encoder + caption encoder with frame–caption and clip–caption heads."""

    def __init__(self, config: ToyClipConfig | None = None):
        super().__init__()
        self.config = config = config or ToyClipConfig()
        # Frame encoder: stride-2 conv stages, a conv at the lowest resolution, flatten (keeps layout).
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.GELU(), nn.Flatten()]
        side = config.size // 2 ** len(config.channels)
        self.frame_encoder = nn.Sequential(*layers, nn.Linear(c_in * side * side, config.frame_dim), nn.GELU())
        self.frame_proj = nn.Sequential(nn.LayerNorm(config.frame_dim), nn.Linear(config.frame_dim, config.embed_dim))
        # Temporal head: dilated 1D convs over frame features; mean and net change over time.
        D = config.temporal_dim
        self.temporal = nn.Sequential(
            nn.Conv1d(config.frame_dim, D, 3, padding=1), nn.GELU(),
            nn.Conv1d(D, D, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv1d(D, D, 3, padding=4, dilation=4), nn.GELU(),
        )
        self.clip_proj = nn.Sequential(nn.LayerNorm(2 * D), nn.Linear(2 * D, config.embed_dim))
        # Caption encoder with its own weights, pooled, one projection per head.
        self.text_encoder = ToyTextEncoder(config.text)
        self.text_frame_proj = nn.Linear(config.text.dim, config.embed_dim)
        self.text_clip_proj = nn.Linear(config.text.dim, config.embed_dim)
        # Learnable inverse temperatures (log scale), one per head (CLIP's logit_scale).
        init = math.log(1.0 / config.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor([init, init]))

    # ------------------------------------------------------------------------------- encoders
    def frame_features(self, frames: Tensor) -> Tensor:
        """``(B, T, H, W, 3)`` in [−1, 1] (any T, H = W) → per-frame features ``h (B, T, F)``."""
        x = resample(check_frames(frames), self.config.frames, self.config.size)
        B = x.shape[0]
        x = rearrange(x, "b t h w c -> (b t) c h w")
        h = self.frame_encoder(x.to(self.logit_scale.dtype))  # (B·T, F)
        return rearrange(h, "(b t) f -> b t f", b=B)

    def embed_frames(self, h: Tensor) -> Tensor:
        """``h (B, T, F)`` → unit frame embeddings ``(B, T, E)``."""
        return F.normalize(self.frame_proj(h), dim=-1)

    def embed_clip(self, h: Tensor) -> Tensor:
        """``h (B, T, F)`` → unit clip embedding ``(B, E)``."""
        g = self.temporal(rearrange(h, "b t f -> b f t"))  # (B, D, T)
        pooled = torch.cat([g.mean(dim=2), g[:, :, -1] - g[:, :, 0]], dim=1)  # (B, 2D)
        return F.normalize(self.clip_proj(pooled), dim=-1)

    def embed_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → unit ``(u_frame (P, E), u_clip (P, E))``."""
        tokens, mask = self.text_encoder.encode(list(prompts))  # (P, L, dim), (P, L)
        pooled = ToyTextEncoder.pooled(tokens, mask)  # (P, dim)
        return F.normalize(self.text_frame_proj(pooled), dim=-1), F.normalize(self.text_clip_proj(pooled), dim=-1)

    # ------------------------------------------------------------------------------- scores
    def similarity_matrices(self, frames: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Every clip against every caption: frame head ``(B, T, P)`` per frame, clip head ``(B, P)``."""
        h = self.frame_features(frames)
        u_frame, u_clip = self.embed_text(prompts)
        s_frame = torch.einsum("bte,pe->btp", self.embed_frames(h), u_frame)
        s_clip = self.embed_clip(h) @ u_clip.T
        return s_frame, s_clip

    def similarity(self, frames: Tensor, prompts: list[str], head: Head = "both") -> Tensor:
        """Matched pairs (video i with prompt i): cosine similarity ``(B,)``; see the module docstring."""
        check_frames(frames, prompts)
        h = self.frame_features(frames)  # (B, T, F)
        u_frame, u_clip = self.embed_text(prompts)
        scores = []
        if head in ("frame", "both"):
            T = h.shape[1]
            keyframes = sorted({0, T // 2, T - 1})  # first, middle, last (RGTD Eq. 13)
            e = self.embed_frames(h[:, keyframes])  # (B, 3, E)
            scores.append((e * u_frame[:, None]).sum(-1).mean(dim=1))
        if head in ("clip", "both"):
            scores.append((self.embed_clip(h) * u_clip).sum(-1))
        return torch.stack(scores).mean(dim=0)

    def loss(self, frames: Tensor, prompts: list[str], labels: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Symmetric InfoNCE with soft targets for both heads; returns (loss, metrics)."""
        s_frame, s_clip = self.similarity_matrices(frames, prompts)  # (B, T, P), (B, P)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        match_frame = caption_matches(prompts, labels, appearance_only=True).to(s_clip.device)  # (B, P)
        match_clip = caption_matches(prompts, labels).to(s_clip.device)
        frame_logits = scale[0] * rearrange(s_frame, "b t p -> t b p")  # one CLIP loss per frame
        loss_frame = _soft_infonce(frame_logits, match_frame.expand(frame_logits.shape))
        loss_clip = _soft_infonce(scale[1] * s_clip[None], match_clip[None])
        loss = loss_frame + loss_clip
        with torch.no_grad():
            metrics = {"loss": float(loss), "loss_frame": float(loss_frame), "loss_clip": float(loss_clip),
                       "temperature_frame": float(1 / scale[0]), "temperature_clip": float(1 / scale[1])}
        return loss, metrics

    # ------------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path, metrics: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically to ``directory``."""
        return save_asset(directory, self.config, self, metrics)

    @classmethod
    def load(cls, name_or_dir: str | Path = SHIPPED_NAME, device: str | torch.device = "cpu") -> ToyClip:
        """The shipped ``toy-clip`` (``src/fewstep/assets/toy-clip/``) or a directory from :meth:`save`."""
        directory = resolve_asset(name_or_dir, SHIPPED_NAME, "toy CLIP")
        model, metrics = load_asset(directory, ToyClipConfig, cls, "toy CLIP", device)
        model.metrics = metrics
        return model


def _soft_infonce(logits: Tensor, match: Tensor) -> Tensor:
    """Symmetric InfoNCE over ``(..., B, P)`` logits with soft targets uniform over ``match``.

    clip → caption: cross-entropy of each row against ``match`` normalised over captions;
    caption → clip: of each column against ``match`` normalised over clips. Every row and column
    holds at least its own pair, so the targets are well defined.
    """
    m = match.to(logits.dtype)
    v2c = -(m / m.sum(-1, keepdim=True) * logits.log_softmax(-1)).sum(-1).mean()
    c2v = -(m / m.sum(-2, keepdim=True) * logits.log_softmax(-2)).sum(-2).mean()
    return (v2c + c2v) / 2


class ToyClipReward(Reward):
    """The toy CLIP as a frozen, differentiable reward (see the module docstring for ``head``)."""

    differentiable = True

    def __init__(self, model: ToyClip, head: Head = "both"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.head = head

    def reward(self, frames: Tensor, prompts: list[str]) -> Tensor:
        return self.model.similarity(frames, list(prompts), self.head)

    @classmethod
    def load(cls, name_or_dir: str | Path = SHIPPED_NAME, head: Head = "both",
             device: str | torch.device = "cpu") -> ToyClipReward:
        return cls(ToyClip.load(name_or_dir, device), head)


# --- training -------------------------------------------------------------------------------------


@torch.no_grad()
def retrieval_metrics(model: ToyClip, clips: LabelledClips, batch_size: int = 64) -> dict[str, float]:
    """Top-1 retrieval among the distinct captions of each batch of ``clips`` (in order).

    ``c2v_*``: for each distinct caption, is the clip it ranks first one it describes?
    ``v2c_*``: for each clip, is the caption it ranks first one that describes it?
    Suffix = head (``frame`` judged on appearance only; ``clip``; ``both`` = the reward).
    ``motion``: with the clip head, is each clip's own caption ranked above the same caption with
    any other motion (speed word dropped for "stays still")?
    """
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    sums: dict[str, list[float]] = {}
    motion_hits: list[Tensor] = []
    for lo in range(0, len(clips), batch_size):
        index = slice(lo, lo + batch_size)
        frames = torch.from_numpy(clips.videos[index]).to(device).float() / 127.5 - 1.0  # (B, T, H, W, 3)
        labels = {k: torch.from_numpy(v[index]) for k, v in clips.labels.items()}
        prompts = clips.prompts[index]
        captions = sorted(set(prompts))
        h = model.frame_features(frames)  # (B, T, F)
        u_frame, u_clip = model.embed_text(captions)  # (P, E) each
        T = h.shape[1]
        e = model.embed_frames(h[:, sorted({0, T // 2, T - 1})])  # (B, 3, E) first/middle/last
        v = model.embed_clip(h)  # (B, E)
        s_frame = torch.einsum("bke,pe->bp", e, u_frame) / e.shape[1]  # (B, P)
        s_clip = v @ u_clip.T  # (B, P)
        for head, s in {"frame": s_frame, "clip": s_clip, "both": (s_frame + s_clip) / 2}.items():
            match = caption_matches(captions, labels, appearance_only=head == "frame").to(device)  # (B, P)
            sums.setdefault(f"c2v_{head}", []).append(float(match.gather(0, s.argmax(0)[None]).float().mean()))
            sums.setdefault(f"v2c_{head}", []).append(float(match.gather(1, s.argmax(1)[:, None]).float().mean()))
        # Motion: each clip's own caption against the same caption with each other motion.
        variants = []
        for text in prompts:
            p = parse_prompt(text)
            variants += [str(Prompt(p.colour, p.shape, m, None if m == "still" else p.speed, p.background))
                         for m in MOTIONS]
        _, u_var = model.embed_text(variants)
        s_var = torch.einsum("be,bme->bm", v, u_var.view(len(prompts), len(MOTIONS), -1))  # (B, 5)
        own = torch.tensor([MOTIONS.index(parse_prompt(t).motion) for t in prompts], device=device)
        motion_hits.append((s_var.argmax(1) == own).float())
    model.train(was_training)
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out["motion"] = float(torch.cat(motion_hits).mean())
    return out


def train_toy_clip(
    steps: int = 1200,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    *,
    config: ToyClipConfig | None = None,
    model: ToyClip | None = None,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    pool_size: int = 3000,
    data: LabelledClips | None = None,
    eval_clips: int = 256,
    log_every: int = 50,
) -> tuple[ToyClip, dict]:
    """Train the toy CLIP on ``ToyWorld("train")`` clips; returns ``(model, metrics)``.

    Phases: render a pool of ``pool_size`` training clips (or use ``data``) → ``steps`` AdamW
    steps (linear warm-up, cosine decay) on pair-augmented batches (``LabelledClips.sample``) →
    retrieval metrics (:func:`retrieval_metrics`) on ``eval_clips`` clips of ``ToyWorld("eval")``
    (keys ``eval_*``) and on two clips per ``EVAL_PROMPTS`` caption (keys ``suite_*``).
    ``model`` continues training an existing model (a fresh optimizer). ``progress(step, steps,
    metrics)`` is called every ``log_every`` steps and at the end.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = (model or ToyClip(config)).to(device).train()
    cfg = model.config
    data = data or LabelledClips.render("train", pool_size, cfg.frames, cfg.size)
    render_s = time.perf_counter() - start

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, steps, warmup_steps))
    metrics: dict = {}
    for step in range(1, steps + 1):
        batch = data.sample(batch_size, rng)
        loss, metrics = model.loss(batch["frames"].to(device), batch["prompts"], batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None and (step % log_every == 0 or step == steps):
            progress(step, steps, metrics)

    model.eval()
    eval_pool = LabelledClips.render("eval", eval_clips, cfg.frames, cfg.size)
    suite = LabelledClips.from_suite(eval_suite(2), cfg.frames, cfg.size)
    results = {f"eval_{k}": v for k, v in retrieval_metrics(model, eval_pool).items()}
    results |= {f"suite_{k}": v for k, v in retrieval_metrics(model, suite, batch_size=len(suite)).items()}
    results |= {"final_loss": metrics.get("loss", float("nan")), "steps": steps, "batch_size": batch_size,
                "seed": seed, "render_seconds": render_s, "seconds": time.perf_counter() - start}
    return model, results


def _warmup_cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
