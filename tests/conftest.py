"""Shared fixtures: tiny random models built in the test (nothing is downloaded or shipped)."""

import pytest
import torch

from fewstep.data.toyworld import VOCAB
from fewstep.models.codec import ToyCodecConfig
from fewstep.models.pipeline import SamplingConfig, ToyPipelineConfig, VideoPipeline
from fewstep.models.text_encoder import ToyTextEncoderConfig
from fewstep.models.toy_dit import ToyDiTConfig


def tiny_pipeline_config(**sampling) -> ToyPipelineConfig:
    """A toy text-to-video model small enough for CPU unit tests (8 frames × 16², latents 4×4×4)."""
    return ToyPipelineConfig(
        backbone=ToyDiTConfig(hidden_dim=32, depth=2, num_heads=2, text_dim=16, timestep_freq_dim=32,
                              latent_frames=4, latent_height=4, latent_width=4),
        codec=ToyCodecConfig(base_channels=16, num_groups=4),
        text_encoder=ToyTextEncoderConfig(vocab=VOCAB, dim=16, depth=1, heads=2),
        sampling=SamplingConfig(**sampling),
        frames=8, size=16,
    )


def make_tiny_pipeline(seed: int = 0, **sampling) -> VideoPipeline:
    torch.manual_seed(seed)
    pipe = VideoPipeline(tiny_pipeline_config(**sampling))
    # move off adaLN-Zero's exact-zero output so predictions depend on inputs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.denoiser.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return pipe.eval()


@pytest.fixture
def tiny_pipeline() -> VideoPipeline:
    return make_tiny_pipeline()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
