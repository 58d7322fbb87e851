"""The toy world's caption encoder: a word tokenizer and a small Transformer encoder.

Every tokenized prompt starts with a special *null* token (id 1) that is always valid, so the
empty prompt ``""`` (the unconditional prompt for CFG, DESIGN §2) is one valid null token
followed by padding. Masks therefore never have an all-pad row, and attention/pooling over
caption tokens never divides by zero or produces NaNs.
"""

from __future__ import annotations

from typing import Any

import pydantic
import torch
from torch import nn

from fewstep.errors import UserError
from fewstep.config import StrictModel, parse_config

PAD_ID = 0
NULL_ID = 1
FIRST_WORD_ID = 2


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary.

    ``tokenizer(prompts) -> (ids (B, L) long, mask (B, L) bool)`` with ``L = max_length``:
    position 0 holds the null token (id 1) for every prompt, then the prompt's words (ids
    from 2, in vocabulary order), then padding (id 0, mask False). Prompts are lower-cased
    and split on whitespace; an unknown word or a prompt longer than ``max_length − 1`` words
    raises :class:`UserError`.
    """

    def __init__(self, vocab: list[str], max_length: int = 12) -> None:
        words = [w.lower() for w in vocab]
        if len(set(words)) != len(words) or any(not w or w.split() != [w] for w in words):
            raise UserError("WordTokenizer: vocab must hold distinct single words (no spaces, case-insensitive)")
        if max_length < 1:
            raise UserError(f"WordTokenizer: max_length must be at least 1, got {max_length}")
        self.vocab = words
        self.max_length = max_length
        self.word_to_id = {w: FIRST_WORD_ID + i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows: pad + null + words."""
        return FIRST_WORD_ID + len(self.vocab)

    def tokenize(self, prompt: str) -> list[int]:
        """One prompt → ids including the leading null token, without padding."""
        ids = [NULL_ID]
        for word in prompt.lower().split():
            if word not in self.word_to_id:
                raise UserError(f"unknown word '{word}' in prompt '{prompt}'; vocabulary: {', '.join(self.vocab)}")
            ids.append(self.word_to_id[word])
        if len(ids) > self.max_length:
            raise UserError(
                f"prompt '{prompt}' has {len(ids) - 1} words; at most {self.max_length - 1} fit (max_length {self.max_length})"
            )
        return ids

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise UserError("WordTokenizer: pass a list of prompts, not a single string")
        ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.long)  # (B, L)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenize(prompt)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, ids != PAD_ID


class ToyTextEncoderConfig(StrictModel):
    """Vocabulary and size of the toy text encoder."""


    vocab: list[str]
    max_length: int = 12  # tokens per prompt, including the leading null token
    dim: int = 64
    depth: int = 2
    heads: int = 4

    @pydantic.model_validator(mode="after")
    def _check(self) -> ToyTextEncoderConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        return self


class ToyTextEncoder(nn.Module):
    """Token + learned positional embedding → pre-norm ``nn.TransformerEncoder`` → LayerNorm.

    ``encode(prompts) -> (tokens (B, L, dim), mask (B, L))``; pad positions of ``tokens`` are
    zero. No dropout anywhere, so the encoder is deterministic in train and eval mode.
    """

    def __init__(self, config: ToyTextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocab, config.max_length)
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, config.dim, padding_idx=PAD_ID)
        self.pos_embed = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=config.dim,
            nhead=config.heads,
            dim_feedforward=4 * config.dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    @classmethod
    def from_config(cls, config: dict[str, Any] | ToyTextEncoderConfig) -> ToyTextEncoder:
        if isinstance(config, ToyTextEncoderConfig):
            return cls(config)
        return cls(parse_config(ToyTextEncoderConfig, config))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids (B, L)`` long, ``mask (B, L)`` bool (True = real) → ``tokens (B, L, dim)``, zero at pads."""
        L = ids.shape[1]
        h = self.token_embed(ids) + self.pos_embed[:L][None]  # (B, L, dim)
        h = self.transformer(h, src_key_padding_mask=~mask)  # (B, L, dim)
        return self.norm(h) * mask[..., None].to(h.dtype)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → ``(tokens (B, L, dim), mask (B, L) bool)`` on the encoder's device."""
        ids, mask = self.tokenizer(prompts)
        device = self.pos_embed.device
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask

    @staticmethod
    def pooled(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean over real tokens: ``(B, L, dim)``, ``(B, L)`` → ``(B, dim)``."""
        keep = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
        return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
