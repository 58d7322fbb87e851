"""Backbone adapters: foreign networks behind one narrow call (STYLE §1, k-diffusion's external.py).

Contract every adapter implements::

    backbone(x, timestep, cond) -> output
        x         (B, C, T, H, W)  latents
        timestep  (B,)             the *model* timestep (``Schedule.model_timestep(t)``), float
        cond      Conditioning     caption tokens (B, L, D) [+ mask (B, L)] [+ extras]
        output    (B, C, T, H, W)  in the backbone's own prediction parameterisation

Adapters only move axes and rename arguments; the meaning of the output (eps / v / flow / …)
is declared once, in :class:`fewstep.models.denoiser.Denoiser`. Adapters: (a) plain modules
(the toy DiT), (b) Wan, (c) CogVideoX, (d) HunyuanVideo. Real weights load from a local
directory only (:func:`load_diffusers_backbone`); nothing is ever fetched from a hub. Hidden block
features of any adapter come from :func:`fewstep.models.features.extract_features` (hooks).

Block-wise split (SwiftVideo (003) Alg. 2): ``backbone.blockwise(x, timestep, cond)`` returns the same
forward as a :class:`BlockwiseForward` — time embedding, patch embedding, the blocks, the output
layer — which :meth:`fewstep.models.denoiser.Denoiser.jvp` walks one piece at a time. The toy DiT
(through :class:`ModuleBackbone`, when its module has ``blockwise``) and Wan have one; the others
raise a one-line error naming the JVP methods that work for them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError


#: Extras whose key starts with this are *visual* conditions (an I2V model's image latent, mask, embeds).
VISUAL_PREFIX = "image"


@dataclass
class Conditioning:
    """What a backbone is conditioned on, batched like the latents."""

    context: Tensor  # (B, L, D) caption token embeddings
    mask: Tensor | None = None  # (B, L) bool, True = real token
    extra: dict[str, Tensor] = field(default_factory=dict)  # (B, ...) e.g. pooled text projections

    def __len__(self) -> int:
        return self.context.shape[0]

    def with_extra(self, extra: dict[str, Tensor]) -> "Conditioning":
        """This condition with ``extra`` added (same batch; a key already present is replaced), e.g.
        ``model.encode_prompts(prompts).with_extra(model.encode_images(images))``."""
        for name, value in extra.items():
            if value.shape[0] != len(self):
                raise ValueError(f"extra {name!r} has batch {value.shape[0]}; the condition has {len(self)}")
        return Conditioning(self.context, self.mask, {**self.extra, **extra})

    def visual(self) -> dict[str, Tensor]:
        """The visual conditions among the extras: keys starting with ``image`` (the I2V seam)."""
        return {k: v for k, v in self.extra.items() if k.startswith(VISUAL_PREFIX)}

    def with_visual_of(self, other: "Conditioning") -> "Conditioning":
        """This condition plus the visual extras of ``other`` it lacks (same batch).

        CFG's unconditional branch of an image-to-video model keeps the image and drops only the
        caption, as diffusers' ``WanImageToVideoPipeline`` and ``CogVideoXImageToVideoPipeline`` do
        (their negative pass gets the same ``condition``/``image_latents``)."""
        missing = {k: v for k, v in other.visual().items() if k not in self.extra}
        return self.with_extra(missing) if missing else self

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(
            self.context.to(*args, **kwargs),
            None if self.mask is None else self.mask.to(kwargs.get("device", self.mask.device)),
            {k: v.to(*args, **kwargs) for k, v in self.extra.items()},
        )

    def index(self, idx) -> "Conditioning":
        """Select samples (``idx``: slice, index tensor or bool mask over the batch)."""
        return Conditioning(
            self.context[idx],
            None if self.mask is None else self.mask[idx],
            {k: v[idx] for k, v in self.extra.items()},
        )

    def repeat(self, n: int) -> "Conditioning":
        """Repeat every sample ``n`` times consecutively (``(B, …) -> (B·n, …)``)."""
        return Conditioning(
            self.context.repeat_interleave(n, dim=0),
            None if self.mask is None else self.mask.repeat_interleave(n, dim=0),
            {k: v.repeat_interleave(n, dim=0) for k, v in self.extra.items()},
        )

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch, zero-padding token sequences to the longest ``L``."""
        length = max(c.context.shape[1] for c in items)
        contexts, masks = [], []
        need_mask = any(c.mask is not None for c in items) or len({c.context.shape[1] for c in items}) > 1
        for c in items:
            pad = length - c.context.shape[1]
            contexts.append(F.pad(c.context, (0, 0, 0, pad)))  # (B, L, D) -> (B, length, D)
            if need_mask:
                m = c.mask if c.mask is not None else torch.ones(c.context.shape[:2], dtype=torch.bool,
                                                                 device=c.context.device)
                masks.append(F.pad(m, (0, pad), value=False))
        keys = set(items[0].extra)
        if any(set(c.extra) != keys for c in items):
            raise ValueError("cannot concatenate conditionings with different extra keys")
        extra = {k: torch.cat([c.extra[k] for c in items]) for k in keys}
        return Conditioning(torch.cat(contexts), torch.cat(masks) if need_mask else None, extra)


@dataclass
class BlockwiseForward:
    """A backbone's forward as the pieces SwiftVideo's block-wise JVP walks (003 Alg. 2).

    Only ``x`` and the model timestep carry tangents; the conditioning (caption tokens and masks,
    rotary tables, pooled text) is closed over as constants. ``time state`` is a tuple of tensors
    (e.g. the adaLN conditioning vector and its per-block modulation) that every block and the
    output layer read.
    """

    time_embed: Callable[[Tensor], tuple[Tensor, ...]]  # T: timestep (B,) → time state
    patch_embed: Callable[[Tensor], Tensor]  # P: x (B, C, T, H, W) → tokens (B, N, D)
    blocks: Sequence[Callable[..., Tensor]]  # B_i: (tokens, *time state) → tokens (B, N, D)
    output: Callable[..., Tensor]  # O: (tokens, *time state) → (B, C, T, H, W), in x's dtype

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The plain forward, piece by piece (equals the backbone's own forward)."""
        state = self.time_embed(timestep)
        h = self.patch_embed(x)
        for block in self.blocks:
            h = block(h, *state)
        return self.output(h, *state)


class Backbone(nn.Module):
    """Base class of the adapters; subclasses implement :meth:`forward` per the contract above."""

    def forward(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def cfg_scales(self, timestep: Tensor, cfg_scale: float) -> float | Tensor:
        """The CFG scale of each sample of a guided call at model timesteps ``(B,)``: ``cfg_scale`` for every sample,
        unless the backbone routes samples to experts with scales of their own (:mod:`fewstep.models.experts`)."""
        return cfg_scale

    def blockwise(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> BlockwiseForward:
        """The forward split for a block-wise JVP (module doc); adapters that have one override this."""
        raise UserError(f"{type(self).__name__} has no block-wise split (SwiftVideo Alg. 2; the toy DiT and Wan "
                        f"have one): use jvp method 'autograd' or 'finite_difference'")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a network computes in (adapters cast inputs to it, outputs back): a diffusers model's own
    ``dtype`` (which skips the modules it keeps in fp32, e.g. Wan's time embedder), else its first weight's."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


class ModuleBackbone(Backbone):
    """(a) A plain module called as ``module(x, timestep, context[, context_mask=mask][, **visual])``.

    This is how the toy DiT plugs in; any network with that signature works. ``visual`` are the
    extras of :data:`VISUAL_KEYS` that the module's ``forward`` names as parameters (an image-conditioned
    toy DiT takes ``image_mask`` and ``image_latent``), cast to the module's dtype.
    """

    #: The visual extras a plain module may take as keyword arguments.
    VISUAL_KEYS = ("image_mask", "image_latent")

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        params = inspect.signature(module.forward).parameters
        self._takes_mask = "context_mask" in params
        self._visual = tuple(k for k in self.VISUAL_KEYS if k in params)

    def forward(self, x, timestep, cond):
        dtype = model_dtype(self.module)  # a module kept in bf16 gets bf16 inputs, returns the caller's dtype
        if dtype == x.dtype == cond.context.dtype:
            return self._call(x, timestep, cond)
        return self._call(x.to(dtype), timestep, Conditioning(cond.context.to(dtype), cond.mask, cond.extra)).to(x.dtype)

    def _kwargs(self, cond: Conditioning, dtype: torch.dtype) -> dict:
        kwargs = {"context_mask": cond.mask} if self._takes_mask and cond.mask is not None else {}
        kwargs.update({k: cond.extra[k].to(dtype) for k in self._visual if k in cond.extra})
        return kwargs

    def _call(self, x, timestep, cond):
        return self.module(x, timestep, cond.context, **self._kwargs(cond, x.dtype))

    def blockwise(self, x, timestep, cond) -> BlockwiseForward:
        """The module's own split (``module.blockwise(x, timestep, context, context_mask, …)``, as the toy DiT's)."""
        if not hasattr(self.module, "blockwise"):
            return super().blockwise(x, timestep, cond)
        return self.module.blockwise(x, timestep, cond.context, **self._kwargs(cond, model_dtype(self.module)))


class WanBackbone(Backbone):
    """(b) diffusers' ``WanTransformer3DModel`` — flow matching, takes ``(B, C, F, H, W)`` and ``1000·t'``.

    The diffusers adapters run the transformer in its own dtype (a bf16 teacher gets bf16 latents and
    caption tokens, as its pipeline feeds it) and return the caller's dtype."""

    prediction_type = "flow"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, timestep, cond):
        dtype = model_dtype(self.model)
        return self.model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=cond.context.to(dtype),
                          return_dict=False)[0].to(x.dtype)

    def image_tokens(self, cond: Conditioning) -> Tensor:
        """The image tokens of a transformer with an image embedder (the I2V adapter's; text-to-video has none)."""
        raise UserError("this Wan transformer has an image embedder: load it as a WanImageToVideoPipeline")

    def blockwise(self, x, timestep, cond) -> BlockwiseForward:
        """``WanTransformer3DModel.forward`` (a ``(B,)`` timestep) as Alg. 2's pieces.

        Phases as in diffusers: rotary tables and caption projection (constants); T = timestep
        sinusoid → ``time_embedder`` → ``time_proj`` (temb (B, D), modulation (B, 6, D)); P = 3D patch
        conv → tokens; the blocks; O = adaLN-modulated ``norm_out`` → ``proj_out`` → unpatchify. Kept in
        step with the forward by the equality test (tests/test_blockwise_jvp.py). A transformer with an image
        embedder (Wan 2.1 I2V) gets ``image_tokens(cond)`` through it, before the caption tokens in the
        cross-attention's context, as its forward does (constants too: they depend on the image only).
        """
        model, out_dtype = self.model, x.dtype
        dtype = model_dtype(model)
        embedder = model.condition_embedder
        batch, _, frames, height, width = x.shape  # (B, C, F, H, W)
        p_t, p_h, p_w = model.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        rotary = model.rope(x.to(dtype))  # depends on the grid only
        context = embedder.text_embedder(cond.context.to(dtype))  # (B, L, D) caption tokens in the model's width
        if embedder.image_embedder is not None:
            image = embedder.image_embedder(self.image_tokens(cond).to(dtype))  # (B, N_img, D)
            context = torch.cat([image, context], dim=1)
        time_dtype = next(embedder.time_embedder.parameters()).dtype

        def time_embed(ts):
            freq = embedder.timesteps_proj(ts)  # (B, freq_dim)
            if freq.dtype != time_dtype and time_dtype != torch.int8:
                freq = freq.to(time_dtype)
            temb = embedder.time_embedder(freq).type_as(context)  # (B, D)
            modulation = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)
            return temb, modulation

        def patch_embed(x_):
            tokens = model.patch_embedding(x_.to(dtype))  # (B, D, F', H', W')
            return tokens.flatten(2).transpose(1, 2).contiguous()  # (B, N, D)

        def make_block(block):
            return lambda h, temb, modulation: block(h, context, modulation, rotary)

        def output(h, temb, modulation):
            shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
            h = (model.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
            h = model.proj_out(h)  # (B, N, p_t·p_h·p_w·C)
            h = h.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
            return h.flatten(6, 7).flatten(4, 5).flatten(2, 3).to(out_dtype)  # (B, C, F, H, W)

        return BlockwiseForward(time_embed, patch_embed, [make_block(b) for b in model.blocks], output)


class CogVideoXBackbone(Backbone):
    """(c) diffusers' ``CogVideoXTransformer3DModel`` — VP, v-prediction (DOLLAR's kind of teacher).

    CogVideoX takes frames-first latents ``(B, F, C, H, W)``; the adapter permutes in and out.
    Models with rotary position embeddings get them computed here from the latent grid.
    """

    prediction_type = "v"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _rotary(self, x: Tensor):
        """3D RoPE for the latent grid, computed as diffusers' CogVideoX pipeline does."""
        cfg = self.model.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        _, _, frames, height, width = x.shape  # (B, C, F, H, W) latents
        p, p_t = cfg.patch_size, cfg.patch_size_t
        grid_h, grid_w = height // p, width // p
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if p_t is None:  # CogVideoX 1.0
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h),
                grid_size=(grid_h, grid_w), temporal_size=frames, device=x.device)
        else:  # CogVideoX 1.5
            cos, sin = get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w),
                device=x.device)
        return cos.to(x.dtype), sin.to(x.dtype)

    def forward(self, x, timestep, cond):
        dtype = model_dtype(self.model)
        hidden = x.permute(0, 2, 1, 3, 4).to(dtype)  # (B, C, F, H, W) -> (B, F, C, H, W)
        out = self.model(hidden_states=hidden, encoder_hidden_states=cond.context.to(dtype), timestep=timestep,
                         image_rotary_emb=self._rotary(x), return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4).to(x.dtype)  # (B, F, C, H, W) -> (B, C, F, H, W)


class HunyuanVideoBackbone(Backbone):
    """(d) diffusers' ``HunyuanVideoTransformer3DModel`` — flow matching, ``(B, C, F, H, W)``.

    Needs the CLIP pooled text projection in ``cond.extra["pooled_projections"]`` (B, D_pool);
    the token mask is passed as ``encoder_attention_mask``. Guidance-distilled checkpoints take
    an embedded guidance scale: ``cond.extra["guidance"]`` (B,) if given, else
    ``embedded_guidance_scale`` (× 1000, as diffusers' pipeline feeds it).
    """

    prediction_type = "flow"

    def __init__(self, model: nn.Module, embedded_guidance_scale: float = 6.0):
        super().__init__()
        self.model = model
        self.embedded_guidance_scale = embedded_guidance_scale

    def forward(self, x, timestep, cond):
        if "pooled_projections" not in cond.extra:
            raise UserError("HunyuanVideo needs cond.extra['pooled_projections'] (the CLIP pooled text embedding)")
        mask = cond.mask if cond.mask is not None else torch.ones(cond.context.shape[:2], dtype=torch.bool,
                                                                  device=x.device)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = cond.extra.get("guidance")
            if guidance is None:
                guidance = torch.full((x.shape[0],), self.embedded_guidance_scale * 1000.0, device=x.device,
                                      dtype=x.dtype)
        dtype = model_dtype(self.model)
        return self.model(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=cond.context.to(dtype),
                          encoder_attention_mask=mask, pooled_projections=cond.extra["pooled_projections"].to(dtype),
                          guidance=guidance, return_dict=False)[0].to(x.dtype)


DIFFUSERS_BACKBONES = {
    "wan": ("WanTransformer3DModel", WanBackbone),
    "cogvideox": ("CogVideoXTransformer3DModel", CogVideoXBackbone),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", HunyuanVideoBackbone),
}


def load_diffusers_backbone(kind: str, path: str | Path, subfolder: str | None = None,
                            dtype: torch.dtype | None = None) -> Backbone:
    """Load a diffusers transformer from a *local* directory (``from_pretrained(..., local_files_only)``).

    ``path`` is either the transformer folder itself or a pipeline folder with ``subfolder``
    (usually ``"transformer"``).
    """
    if kind not in DIFFUSERS_BACKBONES:
        raise UserError(f"backbone kind must be one of {', '.join(DIFFUSERS_BACKBONES)}; got {kind!r}")
    root = Path(path)
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        raise UserError(f"no diffusers model at {folder} (expected {folder / 'config.json'})")
    import diffusers

    cls_name, adapter = DIFFUSERS_BACKBONES[kind]
    model_cls = getattr(diffusers, cls_name)
    model = model_cls.from_pretrained(root, subfolder=subfolder, local_files_only=True, torch_dtype=dtype)
    return adapter(model)
