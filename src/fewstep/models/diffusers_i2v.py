"""Image-to-video pipelines of the diffusers family (:mod:`fewstep.models.diffusers_family`).

Both condition on the clip's first frame the way their diffusers pipelines do, through the seam's
visual extras (:mod:`fewstep.models.family`): :meth:`DiffusersVideoModel.encode_images` turns condition
images ``(B, H, W, 3)`` in [−1, 1] into ``cond.extra`` tensors, and the backbone adapters below
concatenate them to the noisy latent as extra input channels. CFG's unconditional branch keeps them
(:meth:`~fewstep.models.backbones.Conditioning.with_visual_of`), as both pipelines pass the same image
condition to their negative pass.

``WanImageToVideoPipeline`` (Wan 2.1 I2V; Wan 2.2 A14B I2V and Wan-FUN-inp style checkpoints)
    As ``pipeline_wan_i2v.py`` (diffusers 0.42) ``prepare_latents``: the video ``[image, 0, …, 0]``
    (T frames) through the VAE (posterior mode, ``sample_mode="argmax"``), normalised as the latents
    (``image_latent`` (B, C, T', H', W')), and the temporal mask ``image_mask`` (B, 4, T', H', W'): the
    first frame's 1 repeated over the VAE's 4-frame temporal group, zeros after. The transformer sees
    ``cat([x_t, image_mask, image_latent], dim=1)`` (``in_channels = 2C + 4``). A transformer with
    ``image_dim`` (Wan 2.1 I2V) also takes ``image_embeds`` (B, N, D_img): the penultimate hidden states
    of the pipeline's CLIP vision ``image_encoder`` on ``image_processor``'s crop of the image
    (``encode_image``); its caption length must be 512, since diffusers' attention takes the context's last
    512 tokens as the caption and those before them as the image's. Without ``image_dim`` (Wan 2.2 A14B
    I2V, FUN-inp style) the pipeline has no image encoder and the channel concatenation is the whole
    condition. ``expand_timesteps`` (Wan 2.2 TI2V-5B, whose first latent frame is replaced rather than
    concatenated) and a first-and-last-frame transformer (FLF2V) are one-line errors. The adapter only
    builds the transformer's input, so Wan 2.2's second expert takes the same adapter.

``CogVideoXImageToVideoPipeline`` (CogVideoX 1.0 and 1.5 I2V)
    ``prepare_latents``: the image (one frame) through the VAE, scaled by ``scaling_factor`` (divided by
    it when the VAE's ``invert_scale_latents``, CogVideoX 1.5 I2V), then zero latent frames up to the
    model's latent frame count, padding frames of CogVideoX 1.5 included (the pipeline pads the frame count
    before encoding, so the image latent stays at index 0): ``image_latent`` (B, C, T', H', W'). The
    transformer sees ``cat([x_t, image_latent], dim=1)`` (frames-first: concatenated on its channel dim;
    ``in_channels = 2C``) and, when its config has ``ofs_embed_dim`` (CogVideoX 1.5 I2V), ``ofs = 2``
    as the pipeline passes it. Deviation: the pipeline draws the image latent from the VAE posterior
    (``latent_dist.sample(generator)``) where fewstep takes its mode (the seam's encoders are
    deterministic: a cached condition is the one the model samples with); CogVideoX's VAE posterior is
    narrow, and the tests compare with the pipeline's posterior set to its mode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import UserError
from ..utils.frames import to_uint8
from .backbones import BlockwiseForward, CogVideoXBackbone, Conditioning, WanBackbone, model_dtype

if TYPE_CHECKING:  # the family module imports this one at its end (i2v_specs); its names are read at call time
    from .diffusers_family import DiffusersSettings, DiffusersVideoModel, PipelineSpec


def _visual(cond: Conditioning, keys: tuple[str, ...], pipeline: str) -> list[Tensor]:
    """``cond.extra[k]`` for ``keys``; a missing one is a one-line error (an I2V model sampled without its image)."""
    missing = [k for k in keys if k not in cond.extra]
    if missing:
        raise UserError(f"the {pipeline} transformer needs the condition image ({', '.join(missing)} missing from "
                        f"the condition): sample with --image / images=, or train from a latent cache of clips")
    return [cond.extra[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# Wan I2V
# ---------------------------------------------------------------------------------------------

class WanI2VBackbone(WanBackbone):
    """``WanTransformer3DModel`` of ``WanImageToVideoPipeline``: input ``cat([x_t, image_mask, image_latent])``
    on channels, and the CLIP image tokens ``image_embeds`` when the transformer has an image embedder."""

    def _input(self, x: Tensor, cond: Conditioning) -> Tensor:
        mask, latent = _visual(cond, ("image_mask", "image_latent"), "WanImageToVideoPipeline")
        return torch.cat([x, mask.to(x.dtype), latent.to(x.dtype)], dim=1)  # (B, C + M + C, T', H', W')

    def image_tokens(self, cond: Conditioning) -> Tensor:
        """The CLIP image tokens ``image_embeds`` (B, N, D_img) of a transformer with an image embedder."""
        return _visual(cond, ("image_embeds",), "WanImageToVideoPipeline")[0]

    def forward(self, x, timestep, cond):
        dtype = model_dtype(self.model)
        image = None
        if self.model.config.image_dim is not None:
            image = self.image_tokens(cond).to(dtype)
        return self.model(hidden_states=self._input(x, cond).to(dtype), timestep=timestep,
                          encoder_hidden_states=cond.context.to(dtype), encoder_hidden_states_image=image,
                          return_dict=False)[0].to(x.dtype)

    def blockwise(self, x, timestep, cond) -> BlockwiseForward:
        """:meth:`WanBackbone.blockwise` with the condition channels concatenated before the patch embedding
        (constants: their tangent is zero); the CLIP image tokens, when the transformer takes them, join the
        caption's in the cross-attention context (constants as well)."""
        parts = super().blockwise(x, timestep, cond)
        condition = self._input(x, cond)[:, x.shape[1]:]  # (B, M + C, T', H', W')
        embed = parts.patch_embed
        return replace(parts, patch_embed=lambda x_: embed(torch.cat([x_, condition.to(x_.dtype)], dim=1)))


def _wan_i2v_backbone(transformer, settings: "DiffusersSettings") -> WanI2VBackbone:
    return WanI2VBackbone(transformer)


def _wan_i2v_pipeline(pipe) -> None:
    """What fewstep models of ``WanImageToVideoPipeline``: the concatenated first-frame condition."""
    if pipe.config.get("expand_timesteps", False):
        raise UserError("WanImageToVideoPipeline with expand_timesteps (Wan 2.2 TI2V-5B: the first latent frame "
                        "replaced, per-token timesteps) is not supported; fewstep models the concatenated "
                        "first-frame condition of Wan 2.1 / 2.2 A14B I2V")


def _wan_i2v_settings(cfg, settings: "DiffusersSettings") -> None:
    """The transformer takes ``2C + M`` input channels (noisy latent, mask, image latent) for ``C`` output ones;
    one with CLIP image tokens takes 512 caption tokens (diffusers' ``WanAttnProcessor`` splits its context as
    image tokens, then the last 512 as the caption: another caption length would mix them up)."""
    from .diffusers_family import SETTINGS_FILE

    if cfg.image_dim is not None and settings.max_sequence_length != 512:
        raise UserError(f"{SETTINGS_FILE}: max_sequence_length {settings.max_sequence_length} does not fit this Wan "
                        f"I2V transformer, whose attention takes the last 512 context tokens as the caption (after "
                        f"the image tokens); use 512")
    if cfg.get("pos_embed_seq_len") is not None:
        raise UserError("this WanImageToVideoPipeline's transformer embeds a first and a last frame (Wan FLF2V); "
                        "fewstep models first-frame image-to-video")
    if cfg.in_channels <= 2 * cfg.out_channels:
        raise UserError(f"this WanImageToVideoPipeline's transformer takes {cfg.in_channels} input channels; an "
                        f"image-to-video Wan takes 2 × {cfg.out_channels} + the mask's (noisy latent, mask, image "
                        f"latent)")


def wan_mask(batch: int, frames: int, temporal: int, height: int, width: int) -> Tensor:
    """``WanImageToVideoPipeline.prepare_latents``' mask (B, temporal, T', H', W'): 1 on the first frame.

    The per-frame mask (1 for frame 0, 0 after) with its first frame repeated ``temporal`` times, so that
    its ``T + temporal − 1 = temporal · T'`` frames fold into ``temporal`` channels per latent frame.
    """
    mask = torch.ones(batch, 1, frames, height, width)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)  # (B, 1, temporal, H', W')
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)  # (B, 1, temporal·T', H', W')
    mask = mask.view(batch, -1, temporal, height, width)  # (B, T', temporal, H', W')
    return mask.transpose(1, 2)  # (B, temporal, T', H', W')


def _wan_i2v_images(model: "DiffusersVideoModel", images: Tensor) -> dict[str, Tensor]:
    """``image_latent``, ``image_mask`` and (Wan 2.1 I2V) ``image_embeds`` of ``images`` (B, H, W, 3) (module doc)."""
    from .diffusers_family import _wan_factors, _wan_stats

    temporal, _, _ = _wan_factors(model)
    batch, channels, latent_frames, height, width = model.latent_shape(images.shape[0])
    cfg = model.config_of("transformer")
    if cfg.in_channels != 2 * channels + temporal:
        raise UserError(f"this WanImageToVideoPipeline's transformer takes {cfg.in_channels} input channels; its "
                        f"VAE's condition is 2 × {channels} + {temporal} (noisy latent, mask, image latent)")
    frames = model.settings.frames
    image = images.permute(0, 3, 1, 2).unsqueeze(2)  # (B, 3, 1, H, W)
    video = torch.cat([image, image.new_zeros(batch, 3, frames - 1, *image.shape[-2:])], dim=2)  # (B, 3, T, H, W)
    z = model.vae.encode(video.to(model.vae.dtype)).latent_dist.mode().float()  # sample_mode="argmax"
    mean, std = _wan_stats(model, z)
    extra = {"image_latent": (z - mean) / std,  # (B, C, T', H', W')
             "image_mask": wan_mask(batch, frames, temporal, height, width).to(z.device)}
    if cfg.image_dim is not None:
        encoder = model.component("image_encoder")
        if encoder is None or getattr(model.pipe, "image_processor", None) is None:
            raise UserError(f"model {model.source}: its transformer takes CLIP image tokens (image_dim "
                            f"{cfg.image_dim}) but the pipeline has no image_encoder / image_processor")
        pixels = model.pipe.image_processor(images=list(to_uint8(images).cpu().numpy()), return_tensors="pt")
        states = encoder(pixel_values=pixels.pixel_values.to(z.device, encoder.dtype), output_hidden_states=True)
        extra["image_embeds"] = states.hidden_states[-2].float()  # (B, N, D_img): encode_image's penultimate layer
    return extra


# ---------------------------------------------------------------------------------------------
# CogVideoX I2V
# ---------------------------------------------------------------------------------------------

class CogVideoXI2VBackbone(CogVideoXBackbone):
    """``CogVideoXTransformer3DModel`` of ``CogVideoXImageToVideoPipeline``: ``cat([x_t, image_latent])`` on
    channels (the frames-first transformer's dim 2), and ``ofs = 2`` when it has an ofs embedding."""

    def forward(self, x, timestep, cond):
        (latent,) = _visual(cond, ("image_latent",), "CogVideoXImageToVideoPipeline")
        dtype = model_dtype(self.model)
        hidden = torch.cat([x, latent.to(x.dtype)], dim=1).permute(0, 2, 1, 3, 4).to(dtype)  # (B, F, 2C, H, W)
        ofs = None if self.model.config.ofs_embed_dim is None else x.new_full((x.shape[0],), 2.0, dtype=dtype)
        out = self.model(hidden_states=hidden, encoder_hidden_states=cond.context.to(dtype), timestep=timestep,
                         ofs=ofs, image_rotary_emb=self._rotary(x), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4).to(x.dtype)  # (B, F, C, H, W) -> (B, C, F, H, W)


def _cogvideox_i2v_settings(cfg, settings: "DiffusersSettings") -> None:
    from .diffusers_family import _cogvideox_settings

    _cogvideox_settings(cfg, settings)
    if cfg.in_channels != 2 * cfg.out_channels:
        raise UserError(f"this CogVideoXImageToVideoPipeline's transformer takes {cfg.in_channels} input channels; "
                        f"an image-to-video CogVideoX takes 2 × {cfg.out_channels} (noisy latent, image latent)")


def _cogvideox_i2v_backbone(transformer, settings: "DiffusersSettings") -> CogVideoXI2VBackbone:
    _cogvideox_i2v_settings(transformer.config, settings)
    return CogVideoXI2VBackbone(transformer)


def _cogvideox_i2v_images(model: "DiffusersVideoModel", images: Tensor) -> dict[str, Tensor]:
    """``image_latent`` (B, C, T', H', W') of ``images`` (B, H, W, 3): the scaled image latent, then zeros."""
    vae = model.vae
    z = vae.encode(images.permute(0, 3, 1, 2).unsqueeze(2).to(vae.dtype)).latent_dist.mode().float()  # (B, C, 1, h, w)
    scale = vae.config.scaling_factor
    z = z / scale if vae.config.get("invert_scale_latents", False) else z * scale
    batch, channels, frames, height, width = model.latent_shape(images.shape[0])
    return {"image_latent": torch.cat([z, z.new_zeros(batch, channels, frames - 1, height, width)], dim=2)}


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def i2v_specs() -> dict[str, "PipelineSpec"]:
    """The image-to-video classes by name: their text-to-video family's spec with the image condition
    (:mod:`~fewstep.models.diffusers_family` adds them to its ``SPECS`` when it is imported)."""
    from .diffusers_family import COGVIDEOX, WAN

    wan = replace(WAN, pipeline="WanImageToVideoPipeline", backbone=_wan_i2v_backbone,
                  check_settings=_wan_i2v_settings, check_pipeline=_wan_i2v_pipeline, encode_images=_wan_i2v_images)
    cogvideox = replace(COGVIDEOX, pipeline="CogVideoXImageToVideoPipeline", backbone=_cogvideox_i2v_backbone,
                        check_settings=_cogvideox_i2v_settings, encode_images=_cogvideox_i2v_images)
    return {spec.pipeline: spec for spec in (wan, cogvideox)}
