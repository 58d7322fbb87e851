"""Rewards from local transformers models (real teachers; nothing is downloaded): RGTD's R_it, R_iq, R_v.

Each loads a model directory with ``from_pretrained(path, local_files_only=True)`` and its tokenizer
from the same directory, and is differentiable with respect to the frames (RGTD Eq. 13–14 take
their gradients through the decoder)::

    clip       R_it(frame, c) = cos(image embedding, text embedding) of a CLIPModel, averaged over
               frames (HPSv2, RGTD's spatial reward, is such a CLIP ViT-H)
    clip-iqa   R_iq(frame) = softmax(logit_scale·[cos(e, "Good photo."), cos(e, "Bad photo.")])[0], the
               CLIP-IQA antonym-prompt quality score (Wang et al. 2023), averaged over frames
    xclip      R_v(clip, c) = cos(video embedding, prompt-conditioned text embedding) of an XCLIPModel on
               ``num_frames`` frames picked evenly from the clip (RGTD uses InternVideo / ViCLIP)

Frames ``(B, T, H, W, 3)`` in [−1, 1] are preprocessed as the models' image processors do, in torch:
scaled to [0, 1], resized so that the shorter side is the vision config's ``image_size`` (bicubic,
antialiased), centre-cropped to a square and normalised with the ``image_mean`` / ``image_std`` of
``preprocessor_config.json`` (CLIP's own when absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor

from fewstep.errors import UserError
from fewstep.utils.pretrained import image_stats, load_local, resize_center_crop

from .base import Reward, check_frames

#: CLIP's image normalisation (OpenAI), used when a directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_transformers(path: str | Path, class_name: str, what: str):
    """``(model (eval, frozen), tokenizer, image mean, image std)`` from a local directory; one-line errors."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{what} {directory}: not a local transformers model directory (no config.json)")
    model, tokenizer = load_local(class_name, directory, what, tokenizer=True)
    mean, std = image_stats(directory, what, CLIP_MEAN, CLIP_STD)
    return model.eval().requires_grad_(False), tokenizer, mean, std


class TransformersReward(Reward):
    """Shared: the frozen model, its tokenizer and its pixel preprocessing (module doc); a subclass names
    its transformers class (``model_class``) and its name in errors (``label``)."""

    differentiable = True
    model_class: ClassVar[str] = "CLIPModel"
    label: ClassVar[str]

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **extra) -> "TransformersReward":
        model, tokenizer, mean, std = load_transformers(path, cls.model_class, f"reward {cls.label}:")
        return cls(model, tokenizer, mean, std, model.config.vision_config.image_size, **extra).to(device)

    def __init__(self, model, tokenizer, mean, std, size: int):
        super().__init__()
        self.model, self.tokenizer, self.size = model, tokenizer, int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)

    def pixels(self, images: Tensor) -> Tensor:
        """``(N, H, W, 3)`` in [−1, 1] → ``(N, 3, S, S)`` normalised pixel values; differentiable."""
        x = (images.permute(0, 3, 1, 2).float() + 1) / 2  # (N, 3, H, W) in [0, 1]
        x = resize_center_crop(x, self.size)  # (N, 3, S, S)
        return ((x - self.mean) / self.std).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokens(self, texts: list[str]) -> dict[str, Tensor]:
        max_length = self.model.config.text_config.max_position_embeddings
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.mean.device) for k, v in out.items() if k in ("input_ids", "attention_mask")}


class ClipTextReward(TransformersReward):
    """R_it: cosine of a CLIPModel's image and text embeddings, averaged over frames (module doc)."""

    label = "clip"

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the clip reward scores frames against captions; pass one prompt per video")
        B, T = check_frames(frames, prompts).shape[:2]
        out = self.model(pixel_values=self.pixels(rearrange(frames, "b t h w c -> (b t) h w c")),
                         **self.tokens([p for p in prompts for _ in range(T)]))
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # (B·T,) both unit vectors
        return cos.float().reshape(B, T).mean(1)


class ClipQualityReward(TransformersReward):
    """R_iq: CLIP-IQA's antonym prompts on a CLIPModel, averaged over frames (module doc)."""

    label = "clip-iqa"

    def __init__(self, model, tokenizer, mean, std, size: int, prompts: tuple[str, str]):
        super().__init__(model, tokenizer, mean, std, size)
        self.prompts = tuple(prompts)

    @classmethod
    def load(cls, path: str | Path, prompts: tuple[str, str] | list[str] = ("Good photo.", "Bad photo."),
             device: str | torch.device = "cpu") -> "ClipQualityReward":
        if len(prompts) != 2:
            raise UserError(f"reward clip-iqa: prompts must be a [positive, negative] pair, got {list(prompts)}")
        return super().load(path, device, prompts=tuple(prompts))

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        B, T = check_frames(frames, prompts).shape[:2]
        out = self.model(pixel_values=self.pixels(rearrange(frames, "b t h w c -> (b t) h w c")),
                         **self.tokens(list(self.prompts)))
        good = out.logits_per_image.float().softmax(-1)[:, 0]  # (B·T,) logit_scale·cos, over the pair
        return good.reshape(B, T).mean(1)


class XClipReward(TransformersReward):
    """R_v: cosine of an XCLIPModel's video embedding and its video-conditioned text embedding (module doc)."""

    model_class, label = "XCLIPModel", "xclip"

    def reward(self, frames: Tensor, prompts: list[str] | None = None) -> Tensor:
        if prompts is None:
            raise UserError("the xclip reward scores clips against captions; pass one prompt per video")
        B, T = check_frames(frames, prompts).shape[:2]
        n = self.model.config.vision_config.num_frames
        index = torch.linspace(0, T - 1, n, device=frames.device).round().long()  # n frames picked evenly
        pixels = self.pixels(rearrange(frames[:, index], "b t h w c -> (b t) h w c"))
        out = self.model(pixel_values=rearrange(pixels, "(b t) c h w -> b t c h w", b=B), **self.tokens(prompts))
        scale = self.model.logit_scale.exp()
        return (out.logits_per_video.diagonal() / scale).float()  # (B,) video i with its own caption
