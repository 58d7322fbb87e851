"""A small video DiT: the toy teacher backbone.

Architecture (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023, "DiT"):

- patchify the latent video ``(B, C, T, H, W)`` into space-time tokens (einops + linear),
  add a fixed 3D sin-cos positional embedding;
- each block: adaLN-modulated self-attention over *all* space-time tokens, cross-attention
  to the caption tokens (pre-LayerNorm, ungated, as in PixArt-alpha and Wan 2.1), and an
  adaLN-modulated GELU(tanh) MLP; the adaLN shift/scale/gate come from the conditioning
  vector ``c = timestep embedding + pooled text embedding``;
- final layer: adaLN + linear, unpatchify back to ``(B, C, T, H, W)``.

Image-to-video (``condition_channels > 0``): the first-frame condition enters as extra input channels,
``cat([x_t, image_mask, image_latent], dim=1)`` before the patch embedding — the channel order of
diffusers' ``WanImageToVideoPipeline`` (``latent_model_input = cat([latents, condition])`` with
``condition = cat([mask, latent_condition])``) and of Wan-FUN-inp. :func:`add_condition_channels` turns
a text-to-video DiT into one with zero weights on the new channels, so it starts as the T2V model.

adaLN-Zero (DiT §3.2): the modulation and the final linear layer are zero-initialised, so at
init every block is the identity on its residual stream (gates are zero) and the model
outputs exactly zero.

To keep the parameter count small (~1.7 M at default size) the modulation is computed the
"adaLN-single" way (PixArt-alpha §2.3; Wan 2.1 does the same): one shared
``Linear(D, 6·D)`` on ``SiLU(c)``, plus a learned per-block ``(6, D)`` table added to it.
Both start at zero, which keeps the adaLN-Zero property.

Forward-mode AD: the forward uses no in-place ops on activations and no ``.item()``, so
``torch.func.jvp`` w.r.t. ``x`` and ``timestep`` works under
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (DESIGN §5).
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fewstep.config import StrictModel, parse_config
from fewstep.errors import UserError
from fewstep.utils.checkpointing import checkpoint


class ToyDiTConfig(StrictModel):
    """Size and shape of the toy DiT. Defaults give ~1.7 M parameters and 128 tokens for an
    ``(8, 8, 8)`` latent (patch ``(1, 2, 2)`` → 8·4·4 tokens)."""

    in_channels: int = 4
    # image-to-video: channels of [image_mask, image_latent] concatenated after x_t (0 = text-to-video)
    condition_channels: int = 0
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw)
    latent_frames: int = 8  # default grid for the positional-embedding buffer
    latent_height: int = 8
    latent_width: int = 8
    hidden_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    learn_sigma: bool = False
    out_channels: int | None = None  # None → in_channels (× 2 if learn_sigma)
    timestep_freq_dim: int = 256  # size of the sinusoidal timestep features (DiT: 256)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ToyDiTConfig:
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even (sin-cos positional embedding)")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size {self.patch_size} must be positive")
        grid = (self.latent_frames, self.latent_height, self.latent_width)
        if any(n % p for n, p in zip(grid, self.patch_size)):
            raise ValueError(f"latent grid {grid} must be divisible by patch_size {self.patch_size}")
        return self

    @property
    def resolved_out_channels(self) -> int:
        if self.out_channels is not None:
            return self.out_channels
        return self.in_channels * (2 if self.learn_sigma else 1)


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the raw model timestep (DiT ``TimestepEmbedder``).

    The frequencies span periods 1 … ``max_period``, which resolves model timesteps on the
    0–1000 scale (VP integer steps, or ``t·1000`` for Wan-style flow matching) directly.
    ``timestep``: ``(B,)`` float → ``(B, dim)``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=timestep.device, dtype=timestep.dtype) / half
    args = timestep[:, None] * torch.exp(exponent)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(N,)`` positions → ``(N, dim)`` as ``[sin(p·ω), cos(p·ω)]`` (MAE/DiT 1D sin-cos)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    args = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3D sin-cos positional embedding for a ``(T', H', W')`` token grid → ``(T'·H'·W', dim)``.

    The channels are split as in Latte/CogVideoX: about 1/4 for time, 3/8 each for height and
    width (every part even). Token order matches ``(t h w)`` in :meth:`ToyDiT.patchify`.
    """
    dim_hw = 2 * ((3 * dim // 8) // 2)
    dim_t = dim - 2 * dim_hw
    gt, gh, gw = grid
    emb_t = _sincos_1d(dim_t, torch.arange(gt))  # (T', dim_t)
    emb_h = _sincos_1d(dim_hw, torch.arange(gh))  # (H', dim_hw)
    emb_w = _sincos_1d(dim_hw, torch.arange(gw))  # (W', dim_hw)
    emb = torch.cat(
        [
            emb_t[:, None, None, :].expand(gt, gh, gw, dim_t),
            emb_h[None, :, None, :].expand(gt, gh, gw, dim_hw),
            emb_w[None, None, :, :].expand(gt, gh, gw, dim_hw),
        ],
        dim=-1,
    )  # (T', H', W', dim)
    return rearrange(emb, "t h w d -> (t h w) d").float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x·(1 + scale) + shift``; x ``(B, N, D)``, shift/scale ``(B, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
    """Multi-head self-attention over all space-time tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from video tokens to caption tokens (keys masked by ``attn_mask``)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D); context: (B, L, text_dim); attn_mask: (B, 1, 1, L) bool, True = attend
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, D/h)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block with cross-attention (DiT Fig. 3 + PixArt-alpha cross-attention).

    Phases: (1) modulated self-attention, gated; (2) cross-attention to the caption, ungated;
    (3) modulated MLP, gated.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # adaLN-single: per-block table added to the shared projection of c (zero-init, adaLN-Zero).
        self.modulation = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: torch.Tensor,
        shared_mod: torch.Tensor,
        context: torch.Tensor,
        attn_mask: torch.Tensor,
        context_keep: torch.Tensor,
    ) -> torch.Tensor:
        # x: (B, N, D); shared_mod: (B, 6, D); context: (B, L, text_dim)
        # attn_mask: (B, 1, 1, L) bool; context_keep: (B, 1, 1), 0 where a row has no valid token
        mod = shared_mod + self.modulation[None]  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)  # each (B, D)

        # (1) self-attention over all space-time tokens
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        # (2) cross-attention to caption tokens
        x = x + context_keep * self.cross_attn(self.norm_cross(x), context, attn_mask)
        # (3) MLP
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """DiT final layer: adaLN (own zero-init modulation) + zero-init linear to patch values."""

    def __init__(self, dim: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_volume * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D); c: (B, D) → (B, N, pt·ph·pw·C_out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------- model


class ToyDiT(nn.Module):
    """Small text-conditioned video DiT; see the module docstring.

    ``forward(x, timestep, context, context_mask=None, return_features=None)``:

    - ``x``: ``(B, C, T, H, W)`` latents, ``T, H, W`` divisible by ``patch_size``;
    - ``timestep``: ``(B,)`` float *model timestep* (``Schedule.model_timestep(t)``);
    - ``context``: ``(B, L, text_dim)`` caption tokens; ``context_mask``: ``(B, L)`` bool,
      True = real token (None = all real). A row with no real token gets no cross-attention;
    - ``return_features``: block indices (negative allowed); then returns
      ``(out, [ (B, N_tokens, hidden_dim) per index ])``.

    Set ``model.gradient_checkpointing = True`` to checkpoint blocks while training.
    """

    def __init__(self, config: ToyDiTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else ToyDiTConfig()
        dim = config.hidden_dim
        pt, ph, pw = config.patch_size
        self.out_channels = config.resolved_out_channels
        self.gradient_checkpointing = False

        self.patch_embed = nn.Linear((config.in_channels + config.condition_channels) * pt * ph * pw, dim)
        self.t_embedder = nn.Sequential(nn.Linear(config.timestep_freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_pool_embedder = nn.Sequential(nn.Linear(config.text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # adaLN-single shared projection c → 6 modulation vectors per block (zero-init).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [DiTBlock(dim, config.text_dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(dim, pt * ph * pw, self.out_channels)

        self.default_grid = (config.latent_frames // pt, config.latent_height // ph, config.latent_width // pw)
        pos = sincos_pos_embed_3d(dim, self.default_grid)[None]  # (1, N, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        self._pos_embed_cache: dict[tuple[tuple[int, int, int], torch.device], torch.Tensor] = {}
        self.initialize_weights()

    @classmethod
    def from_config(cls, config: dict[str, Any] | ToyDiTConfig) -> ToyDiT:
        if isinstance(config, ToyDiTConfig):
            return cls(config)
        return cls(parse_config(ToyDiTConfig, config))

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embedder MLPs, zero adaLN + final layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for mlp in (self.t_embedder, self.text_pool_embedder):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: modulation and output start at zero.
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- tokens <-> video

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` → ``(B, T'·H'·W', C·pt·ph·pw)``, tokens in ``(t h w)`` order."""
        pt, ph, pw = self.config.patch_size
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``(B, T'·H'·W', C·pt·ph·pw)`` → ``(B, C, T, H, W)``."""
        pt, ph, pw = self.config.patch_size
        gt, gh, gw = grid
        return rearrange(
            tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=gt, h=gh, w=gw, pt=pt, ph=ph, pw=pw
        )

    def pos_embed_for(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Sin-cos embedding ``(1, N, D)`` for a token grid; non-default grids are computed once and cached."""
        if grid == self.default_grid:
            return self.pos_embed.to(dtype)
        key = (grid, device)
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = sincos_pos_embed_3d(self.config.hidden_dim, grid)[None].to(device)
        return self._pos_embed_cache[key].to(dtype)

    # -- forward

    def _with_condition(self, x: torch.Tensor, image_mask: torch.Tensor | None,
                        image_latent: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, C, T, H, W), or ``cat([x, image_mask, image_latent])`` (B, C + condition_channels, T, H, W)
        for an image-conditioned DiT."""
        need = self.config.condition_channels
        if not need:
            return x
        if image_mask is None or image_latent is None:
            raise UserError("ToyDiT: this model is image-conditioned; the condition needs 'image_mask' and "
                            "'image_latent' extras (model.encode_images)")
        xc = torch.cat([x, image_mask.to(x.dtype), image_latent.to(x.dtype)], dim=1)  # (B, C + M + C_img, T, H, W)
        if xc.shape[1] != x.shape[1] + need or xc.shape[2:] != x.shape[2:]:
            raise UserError(f"ToyDiT: image_mask {tuple(image_mask.shape)} and image_latent {tuple(image_latent.shape)} "
                            f"must add {need} channels of x's grid {tuple(x.shape[2:])}")
        return xc

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise UserError(f"ToyDiT: x has shape {tuple(x.shape)}; expected (B, {cfg.in_channels}, T, H, W)")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise UserError(
                f"ToyDiT: latent size {tuple(x.shape[2:])} is not divisible by patch_size {cfg.patch_size}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim or context.shape[0] != x.shape[0]:
            raise UserError(
                f"ToyDiT: context has shape {tuple(context.shape)}; expected ({x.shape[0]}, L, {cfg.text_dim})"
            )
        return tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))  # type: ignore[return-value]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        return_features: list[int] | None = None,
        image_mask: torch.Tensor | None = None,
        image_latent: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        grid = self._check_inputs(x, context)
        B = x.shape[0]
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        feature_ids = self._resolve_feature_ids(return_features)

        # 1. tokens: patchify [x_t (, image_mask, image_latent)] + fixed positional embedding
        h = self.patch_embed(self.patchify(self._with_condition(x, image_mask, image_latent)))  # (B, N, D)
        h = h + self.pos_embed_for(grid, h.device, h.dtype)

        # 2. conditioning c = timestep embedding + pooled caption embedding
        t_freq = timestep_embedding(timestep.to(h.dtype), self.config.timestep_freq_dim)  # (B, F)
        keep = context_mask.to(context.dtype)[..., None]  # (B, L, 1)
        pooled = (context * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, text_dim)
        c = self.t_embedder(t_freq) + self.text_pool_embedder(pooled)  # (B, D)
        shared_mod = rearrange(self.adaLN_modulation(c), "b (six d) -> b six d", six=6)  # (B, 6, D)

        # 3. cross-attention mask; a row with no valid token attends to all keys and is then zeroed
        has_context = context_mask.any(dim=1)  # (B,)
        attn_mask = (context_mask | ~has_context[:, None])[:, None, None, :]  # (B, 1, 1, L)
        context_keep = has_context.to(h.dtype)[:, None, None]  # (B, 1, 1)

        # 4. transformer blocks
        features = []
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_checkpoint:
                h = checkpoint(block, h, shared_mod, context, attn_mask, context_keep)
            else:
                h = block(h, shared_mod, context, attn_mask, context_keep)
            if i in feature_ids:
                features.append((i, h))

        # 5. final adaLN + linear, back to (B, C_out, T, H, W)
        out = self.unpatchify(self.final_layer(h, c), grid)
        if return_features is None:
            return out
        by_id = dict(features)
        return out, [by_id[i] for i in feature_ids]

    def blockwise(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  context_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                  image_latent: torch.Tensor | None = None):
        """:meth:`forward` as the pieces of SwiftVideo's block-wise JVP (003 Alg. 2): a
        :class:`~fewstep.models.backbones.BlockwiseForward` whose time state is ``(c, shared_mod)``.

        The caption (pooled embedding, cross-attention mask) and an I2V model's image channels (no tangent)
        are computed here once and closed over;
        phases and shapes are those of :meth:`forward` (steps 1–5), which it must equal (tested).
        Inputs in another dtype than the weights are cast in, the output cast back.
        """
        from .backbones import BlockwiseForward

        grid = self._check_inputs(x, context)
        dtype, out_dtype = self.patch_embed.weight.dtype, x.dtype
        context = context.to(dtype)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        keep = context_mask.to(context.dtype)[..., None]  # (B, L, 1)
        pooled = (context * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, text_dim)
        text_c = self.text_pool_embedder(pooled)  # (B, D)
        has_context = context_mask.any(dim=1)  # (B,)
        attn_mask = (context_mask | ~has_context[:, None])[:, None, None, :]  # (B, 1, 1, L)
        context_keep = has_context.to(dtype)[:, None, None]  # (B, 1, 1)

        def time_embed(ts):  # 2. c = timestep embedding + pooled caption embedding
            if ts.ndim == 0:
                ts = ts.expand(x.shape[0])
            c = self.t_embedder(timestep_embedding(ts.to(dtype), self.config.timestep_freq_dim)) + text_c  # (B, D)
            return c, rearrange(self.adaLN_modulation(c), "b (six d) -> b six d", six=6)  # (B, D), (B, 6, D)

        def patch_embed(x_):  # 1. tokens
            h = self.patch_embed(self.patchify(self._with_condition(x_.to(dtype), image_mask, image_latent)))  # (B, N, D)
            return h + self.pos_embed_for(grid, h.device, h.dtype)

        def make_block(block):  # 4. one transformer block
            return lambda h, c, shared_mod: block(h, shared_mod, context, attn_mask, context_keep)

        def output(h, c, shared_mod):  # 5. final adaLN + linear → (B, C_out, T, H, W)
            return self.unpatchify(self.final_layer(h, c), grid).to(out_dtype)

        return BlockwiseForward(time_embed, patch_embed, [make_block(b) for b in self.blocks], output)

    def _resolve_feature_ids(self, return_features: list[int] | None) -> list[int]:
        if return_features is None:
            return []
        depth = self.config.depth
        bad = [i for i in return_features if not -depth <= i < depth]
        if bad:
            raise UserError(f"ToyDiT: return_features {bad} out of range for depth {depth} (use -{depth}..{depth - 1})")
        return [i % depth for i in return_features]


def add_condition_channels(model: ToyDiT, channels: int) -> ToyDiT:
    """A copy of the text-to-video ``model`` that takes ``channels`` condition channels after ``x_t``.

    Every weight is copied; the patch embedding's columns of the new channels are zero, so the copy
    computes exactly what ``model`` does whatever the condition holds, and fine-tuning starts from the
    text-to-video teacher (the way image-to-video and inpainting models are initialised from a T2V one:
    Wan-FUN-inp, SVD's extra input channels). Columns are channel-major (``patchify``'s ``(c pt ph pw)``).
    """
    if model.config.condition_channels:
        raise UserError("add_condition_channels: the model is already image-conditioned")
    config = model.config.model_copy(update={"condition_channels": channels})
    out = ToyDiT(config).to(model.patch_embed.weight.device, model.patch_embed.weight.dtype)
    state = dict(model.state_dict())
    weight = state.pop("patch_embed.weight")  # (D, C·pt·ph·pw)
    pv = math.prod(config.patch_size)
    state["patch_embed.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], channels * pv)], dim=1)
    out.load_state_dict(state)
    return out
