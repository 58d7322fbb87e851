"""The toy world's contrastive caption scorer ("toy CLIP"): frame–caption and clip–caption heads.

RGTD scores the first/middle/last frames with an image–text reward (RGTD Eq. 13) and the whole
clip with a video–text reward (RGTD Eq. 14). The toy CLIP provides both from one model::

    frames (B, T, H, W, 3) ──2D conv per frame──▶ h_t = [appearance, keypoints] (B, T, F + 2K)
        appearance ──▶ frame embeddings e_t (B, T, E)
        h_t ──temporal convs over t ⊕ net change of h over t──▶ clip embedding v (B, E)
    caption ──ToyTextEncoder──masked mean──▶ two projections ──▶ u_frame (E,), u_clip (E,)

All embeddings are L2-normalised; similarities are cosines. Appearance is pooled over space
(position-invariant); the position of what the frame encoder detects is kept as K spatial
soft-argmax keypoints (Levine et al., 2016), whose change over time the temporal head reads as
motion direction and speed.

Training (:func:`train_toy_clip`) is symmetric InfoNCE (CLIP, Radford et al. 2021) with a
learnable temperature per head, on batches of toy-world clips. A batch may hold several clips a
caption describes (captions leave speed and background open, and a frame cannot show motion),
so the targets are *soft*: uniform over every clip (caption) that satisfies the caption (clip),
judged from the attributes the clips realise. The frame head counts appearance only (colour,
shape, background), the clip head every attribute. Batches pair each clip with a flipped or
time-reversed copy (same appearance, other motion), and the caption side also holds
counterfactual captions — each caption with its colour, shape or motion swapped (NegCLIP) —
which the clips must rank below their own; without them the subtle shape words are learned
last. The conv stages use BatchNorm (frozen statistics at scoring time, ``eval()`` mode).

Reward (:class:`ToyClipReward`, differentiable): ``frame`` = mean over the first/middle/last
frames of cos(e_t, u_frame); ``clip`` = cos(v, u_clip); ``both`` = their mean. Frames of another
size are resized (bilinear) and the clip head sees ``config.frames`` frames picked evenly from
the clip (:func:`resample`), so clips of any length and size are scored.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from fewstep.config import StrictModel
from fewstep.data.toyworld import COLOURS, FRAMES, MOTIONS, SHAPES, SIZE, VOCAB, Prompt, eval_suite, parse_prompt
from fewstep.errors import UserError
from fewstep.models.text_encoder import ToyTextEncoder, ToyTextEncoderConfig

from .base import Reward, check_frames, keyframe_indices, load_asset, resolve_asset, save_asset
from .training_data import LabelledClips, Progress, caption_matches, fit

SHIPPED_NAME = "toy-clip"
Head = Literal["frame", "clip", "both"]


def _default_text() -> ToyTextEncoderConfig:
    return ToyTextEncoderConfig(vocab=VOCAB, dim=64, depth=2, heads=4)


class ToyClipConfig(StrictModel):
    """Architecture of the toy CLIP (the clip geometry it was trained on included)."""

    frames: int = Field(FRAMES // 2, ge=2, description="frames the clip head picks evenly from a clip")
    size: int = Field(SIZE, ge=8, description="frame height = width the video encoder expects, px")
    channels: list[int] = Field([16, 32, 64], min_length=2, description="one stride-2 conv stage each")
    blocks: list[int] = Field([0, 1, 0], description="extra stride-1 convs per stage (same length as channels)")
    keypoints: int = Field(16, ge=1, description="soft-argmax keypoints read from the second-to-last stage")
    frame_dim: int = 128  # appearance feature width F
    temporal_dim: int = 128  # width of the temporal head
    embed_dim: int = 64  # joint embedding width E
    text: ToyTextEncoderConfig = Field(default_factory=_default_text)
    init_temperature: float = Field(0.07, gt=0)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ToyClipConfig:
        if len(self.blocks) != len(self.channels):
            raise ValueError(f"blocks has {len(self.blocks)} entries; expected one per stage ({len(self.channels)})")
        if self.size % (2 ** len(self.channels)):
            raise ValueError(f"size {self.size} must be divisible by 2^len(channels) = {2 ** len(self.channels)}")
        return self


def resample(frames: Tensor, frames_out: int | None, size_out: int) -> Tensor:
    """``(B, T, H, W, 3)`` → ``(B, frames_out, size_out, size_out, 3)``; identity where equal.

    Time: the frames at ``round(linspace(0, T − 1, frames_out))`` (real frames, no blending; all
    of them when ``frames_out`` is None). Space: bilinear, antialiased when shrinking.
    Differentiable with respect to ``frames``.
    """
    B, T, H, W, _ = frames.shape
    if frames_out is not None and frames_out != T:
        index = torch.linspace(0, T - 1, frames_out, device=frames.device).round().long()
        frames = frames[:, index]
    if (H, W) != (size_out, size_out):
        t = frames.shape[1]
        x = rearrange(frames, "b t h w c -> (b t) c h w")
        x = F.interpolate(x, size=(size_out, size_out), mode="bilinear", align_corners=False,
                          antialias=size_out < max(H, W))
        frames = rearrange(x, "(b t) c h w -> b t h w c", t=t)
    return frames


def soft_argmax(logits: Tensor) -> Tensor:
    """Spatial soft-argmax (Levine et al., 2016): ``(N, K, h, w)`` → expected ``(x, y)`` in [−1, 1], ``(N, 2K)``."""
    N, K, h, w = logits.shape
    p = logits.flatten(2).softmax(-1).view(N, K, h, w)
    xs = torch.linspace(-1, 1, w, device=logits.device, dtype=logits.dtype)
    ys = torch.linspace(-1, 1, h, device=logits.device, dtype=logits.dtype)
    x = torch.einsum("nkhw,w->nk", p, xs)
    y = torch.einsum("nkhw,h->nk", p, ys)
    return torch.cat([x, y], dim=1)


def time_slope(h: Tensor) -> Tensor:
    """Least-squares slope over time × (T − 1), ``(B, T, F)`` → ``(B, F)``: each feature's net change."""
    T = h.shape[1]
    t = torch.arange(T, device=h.device, dtype=h.dtype)
    tc = (t - t.mean()) / (t - t.mean()).square().sum()  # (T,)
    return torch.einsum("btf,t->bf", h, tc) * (T - 1)


class ToyClip(nn.Module):
    """Video/frame encoder + caption encoder with frame–caption and clip–caption heads."""

    def __init__(self, config: ToyClipConfig | None = None):
        super().__init__()
        self.config = config = config or ToyClipConfig()
        # Frame encoder: stride-2 conv stages; keypoints (where) from the second-to-last stage's
        # map, appearance (what) from mean ⊕ max pooling of the last one.
        c_in, stages = 3, []
        for c, blocks in zip(config.channels, config.blocks):
            layers = [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            for _ in range(blocks):
                layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            stages.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.keypoint_logits = nn.Conv2d(config.channels[-2], config.keypoints, 1)
        self.appearance = nn.Sequential(nn.Linear(2 * c_in, config.frame_dim), nn.GELU())
        self.frame_proj = nn.Sequential(nn.LayerNorm(config.frame_dim), nn.Linear(config.frame_dim, config.embed_dim))
        # Temporal head over per-frame [appearance, keypoints]: dilated 1D convs, then the mean of
        # their output and the net change (time_slope) of the frame features.
        width, D = config.frame_dim + 2 * config.keypoints, config.temporal_dim
        self.temporal = nn.Sequential(
            nn.Conv1d(width, D, 3, padding=1), nn.GELU(),
            nn.Conv1d(D, D, 3, padding=2, dilation=2), nn.GELU(),
        )
        self.clip_proj = nn.Sequential(nn.LayerNorm(D + width), nn.Linear(D + width, D), nn.GELU(),
                                       nn.Linear(D, config.embed_dim))
        # Caption encoder with its own weights, pooled, one projection per head.
        self.text_encoder = ToyTextEncoder(config.text)
        self.text_frame_proj = nn.Linear(config.text.dim, config.embed_dim)
        self.text_clip_proj = nn.Linear(config.text.dim, config.embed_dim)
        # Learnable inverse temperatures (log scale), one per head (CLIP's logit_scale).
        init = math.log(1.0 / config.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor([init, init]))
        self.metrics: dict = {}  # training metrics, filled by load()

    # ------------------------------------------------------------------------------- encoders
    def frame_features(self, frames: Tensor) -> Tensor:
        """``(B, T, H, W, 3)`` in [−1, 1] (any T; frames resized to the model's size) → per-frame
        ``h (B, T, F + 2K)`` = [appearance (F), keypoint coordinates (2K)]."""
        x = resample(check_frames(frames), None, self.config.size)
        B = x.shape[0]
        x = rearrange(x, "b t h w c -> (b t) c h w").to(self.logit_scale.dtype)
        for stage in self.stages[:-1]:
            x = stage(x)
        keypoints = soft_argmax(self.keypoint_logits(x))  # (B·T, 2K)
        x = self.stages[-1](x)  # (B·T, C, h, w)
        appearance = self.appearance(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))  # (B·T, F)
        h = torch.cat([appearance, keypoints], dim=1)
        return rearrange(h, "(b t) f -> b t f", b=B)

    def embed_frames(self, h: Tensor) -> Tensor:
        """``h (B, T, F + 2K)`` → unit frame embeddings ``(B, T, E)`` (from appearance only)."""
        return F.normalize(self.frame_proj(h[..., : self.config.frame_dim]), dim=-1)

    def embed_clip(self, h: Tensor) -> Tensor:
        """``h (B, T, F + 2K)`` → unit clip embedding ``(B, E)``."""
        g = self.temporal(rearrange(h, "b t f -> b f t"))  # (B, D, T)
        pooled = torch.cat([g.mean(dim=2), time_slope(h)], dim=1)  # (B, D + F + 2K)
        return F.normalize(self.clip_proj(pooled), dim=-1)

    def embed_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → unit ``(u_frame (P, E), u_clip (P, E))``."""
        tokens, mask = self.text_encoder.encode(list(prompts))  # (P, L, dim), (P, L)
        pooled = ToyTextEncoder.pooled(tokens, mask)  # (P, dim)
        return F.normalize(self.text_frame_proj(pooled), dim=-1), F.normalize(self.text_clip_proj(pooled), dim=-1)

    # ------------------------------------------------------------------------------- scores
    def clip_frames(self, frames: Tensor) -> Tensor:
        """The ``config.frames`` frames of a clip the clip head sees (:func:`resample` in time)."""
        return resample(check_frames(frames), self.config.frames, frames.shape[2])

    def similarity_matrices(self, frames: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Every clip against every caption: frame head ``(B, T', P)`` on each of the
        ``config.frames`` frames the clip head sees, clip head ``(B, P)``."""
        h = self.frame_features(self.clip_frames(frames))
        u_frame, u_clip = self.embed_text(prompts)
        s_frame = torch.einsum("bte,pe->btp", self.embed_frames(h), u_frame)
        s_clip = self.embed_clip(h) @ u_clip.T
        return s_frame, s_clip

    def similarity(self, frames: Tensor, prompts: list[str], head: Head = "both") -> Tensor:
        """Matched pairs (video i with prompt i): cosine similarity ``(B,)``; see the module docstring."""
        check_frames(frames, prompts)
        u_frame, u_clip = self.embed_text(prompts)
        scores = []
        if head in ("frame", "both"):
            keyframes = keyframe_indices(frames.shape[1])  # first, middle, last of the clip (RGTD Eq. 13)
            e = self.embed_frames(self.frame_features(frames[:, keyframes]))  # (B, 3, E)
            scores.append((e * u_frame[:, None]).sum(-1).mean(dim=1))
        if head in ("clip", "both"):
            h = self.frame_features(self.clip_frames(frames))  # (B, T', F + 2K)
            scores.append((self.embed_clip(h) * u_clip).sum(-1))
        return torch.stack(scores).mean(dim=0)

    def forward(self, frames: Tensor, prompts: list[str], head: Head = "both") -> Tensor:
        """:meth:`similarity`: the reward's call goes through ``forward``, so that a wrapper's hooks (FSDP's
        unsharding, when the reward is a role) run."""
        return self.similarity(frames, prompts, head)

    def loss(self, frames: Tensor, prompts: list[str], labels: dict[str, Tensor],
             negatives: list[str] = ()) -> tuple[Tensor, dict]:
        """Symmetric InfoNCE with soft targets for both heads; returns (loss, metrics).

        ``negatives`` are extra captions (e.g. :func:`counterfactual_captions`) that join the
        caption side: clips must rank their captions above them (any clip a negative happens
        to describe counts it as a positive); captions without a clip add no caption → clip term.
        """
        captions = list(prompts) + list(negatives)
        s_frame, s_clip = self.similarity_matrices(frames, captions)  # (B, T, P), (B, P)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        match_frame = caption_matches(captions, labels, appearance_only=True).to(s_clip.device)  # (B, P)
        match_clip = caption_matches(captions, labels).to(s_clip.device)
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
    caption → clip: of each column against ``match`` normalised over clips, for the columns
    that have a clip at all (every row holds at least its own caption).
    """
    m = match.to(logits.dtype)
    v2c = -(m / m.sum(-1, keepdim=True) * logits.log_softmax(-1)).sum(-1).mean()
    count = m.sum(-2)  # (..., P) clips per caption
    has_clip = count > 0
    c2v = -(m / count.clamp(min=1)[..., None, :] * logits.log_softmax(-2)).sum(-2)  # (..., P)
    c2v = (c2v * has_clip).sum() / has_clip.sum()
    return (v2c + c2v) / 2


def counterfactual_captions(prompts: list[str], generator: np.random.Generator) -> list[str]:
    """Hard negative captions (NegCLIP, Yuksekgonul et al. 2023): each distinct caption with its
    colour, its shape and its motion replaced in turn by another at random (a speed word is kept
    for a new direction and dropped for "stays still")."""
    out = []
    for text in sorted(set(prompts)):
        p = parse_prompt(text)
        colour = str(generator.choice([c for c in COLOURS if c != p.colour]))
        shape = str(generator.choice([s for s in SHAPES if s != p.shape]))
        motion = str(generator.choice([m for m in MOTIONS if m != p.motion]))
        out += [str(Prompt(colour, p.shape, p.motion, p.speed, p.background)),
                str(Prompt(p.colour, shape, p.motion, p.speed, p.background)),
                str(Prompt(p.colour, p.shape, motion, None if motion == "still" else p.speed, p.background))]
    return out


class ToyClipReward(Reward):
    """The toy CLIP as a frozen, differentiable reward (see the module docstring for ``head``)."""

    differentiable = True

    def __init__(self, model: ToyClip, head: Head = "both"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.head = head

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the toy-clip reward scores videos against captions; pass one prompt per video")
        return self.model(frames, list(prompts), self.head)

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
        u_frame, u_clip = model.embed_text(captions)  # (P, E) each
        T = frames.shape[1]
        e = model.embed_frames(model.frame_features(frames[:, sorted({0, T // 2, T - 1})]))  # (B, 3, E)
        v = model.embed_clip(model.frame_features(model.clip_frames(frames)))  # (B, E)
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
    steps: int = 500,
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
    group: int = 1,
    hard_negatives: bool = True,
    eval_clips: int = 256,
    log_every: int = 50,
) -> tuple[ToyClip, dict]:
    """Train the toy CLIP on ``ToyWorld("train")`` clips; returns ``(model, metrics)``.

    Phases: render a pool of ``pool_size`` training clips at the toy world's geometry (or use
    ``data``, e.g. one pool shared with ``train_feature_net``) → ``steps`` AdamW steps (linear
    warm-up, cosine decay) on pair-augmented batches (``LabelledClips.sample``; ``group > 1``
    groups clips by colour and background) with counterfactual captions (``hard_negatives``) →
    retrieval metrics (:func:`retrieval_metrics`) on ``eval_clips`` clips of ``ToyWorld("eval")``
    (keys ``eval_*``) and on two clips per ``EVAL_PROMPTS`` caption (keys ``suite_*``), rendered
    at the training clips' geometry.
    ``model`` continues training an existing model (a fresh optimizer). ``progress(step, steps,
    metrics)`` is called every ``log_every`` steps and at the end.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = (model or ToyClip(config)).to(device).train()
    data = data or LabelledClips.render("train", pool_size)  # the toy world's geometry; the model resamples
    render_s = time.perf_counter() - start

    def loss_fn():
        batch = data.sample(batch_size, rng, group=group)
        negatives = counterfactual_captions(batch["prompts"], rng) if hard_negatives else []
        return model.loss(batch["frames"].to(device), batch["prompts"], batch["labels"], negatives)

    metrics = fit(model, steps, lr, warmup_steps, loss_fn, progress, log_every)

    model.eval()
    frames, size = data.videos.shape[1:3]  # evaluate at the geometry trained on
    eval_pool = LabelledClips.render("eval", eval_clips, frames, size)
    suite = LabelledClips.from_suite(eval_suite(2), frames, size)
    results = {f"eval_{k}": v for k, v in retrieval_metrics(model, eval_pool).items()}
    results |= {f"suite_{k}": v for k, v in retrieval_metrics(model, suite, batch_size=len(suite)).items()}
    results |= {"final_loss": metrics.get("loss", float("nan")), "steps": steps, "batch_size": batch_size,
                "seed": seed, "render_seconds": render_s, "seconds": time.perf_counter() - start}
    return model, results


class ToyClipFrames(nn.Module):
    """The toy CLIP's frame encoder (its stride-2 conv stages) as a frozen image feature network: images
    ``(N, 3, H, W)`` in [−1, 1] → ``[(N, C_k, h_k, w_k)]`` at the tapped ``stages`` (SwiftVideo's
    distribution alignment on the toy world, as DINOv2 on a real teacher)."""

    def __init__(self, clip, stages: list[int] | None = None):
        super().__init__()
        n = len(clip.stages)
        taps = sorted(range(n) if stages is None else {s % n for s in stages})
        self.size = clip.config.size
        self.stages = clip.stages[: taps[-1] + 1]  # (shared modules; the text side is not kept)
        self.taps = taps
        self.channels = [clip.config.channels[i] for i in taps]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = images
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.size < max(x.shape[-2:]))
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (N, C_i, h_i, w_i)
            if i in self.taps:
                maps.append(x)
        return maps


def toy_clip_frames(path: str | None = None, stages: list[int] | None = None) -> ToyClipFrames:
    """:class:`ToyClipFrames` of a shipped toy CLIP (default ``toy-clip``) or a directory."""
    return ToyClipFrames(ToyClip.load(path or "toy-clip"), stages)
