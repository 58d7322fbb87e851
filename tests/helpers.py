"""Helpers shared by the test modules (no tests here): tiny models, objective stand-ins, CLI runs.

Test modules import from here, never from each other; fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fewstep.data.toyworld import VOCAB
from fewstep.diffusion.schedules import FlowMatching, VPDiscrete
from fewstep.engine.config import EngineConfig
from fewstep.models.backbones import Backbone, Conditioning, WanBackbone
from fewstep.models.codec import ToyCodecConfig
from fewstep.models.denoiser import Denoiser
from fewstep.models.pipeline import SamplingConfig, ToyPipelineConfig, VideoPipeline
from fewstep.models.text_encoder import ToyTextEncoderConfig
from fewstep.models.toy_dit import ToyDiTConfig
from fewstep.objectives.base import Batch, StepContext
from fewstep.config import parse_config
from fewstep.objectives.student import GeneratorConfig, StudentGenerator

F64 = torch.float64
TEXT_DIM = 16  # caption width of the tiny diffusers backbones


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

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


def perturb(module, scale=0.02, seed=0):
    """Random weights everywhere (zero-initialised output layers would make tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make_wan() -> Denoiser:
    """A tiny diffusers Wan transformer (flow matching) behind the Wan adapter: latents (B, 4, T, 4k, 4k)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=32)
    return Denoiser(WanBackbone(perturb(model)), FlowMatching(shift=3.0), "flow")


# ---------------------------------------------------------------------------------------------
# What objectives see: roles, contexts, batches; Gaussian toys with analytic posteriors
# ---------------------------------------------------------------------------------------------

def model_time(schedule, timestep):
    """Continuous t from the backbone's model timestep (inverse of Schedule.model_timestep)."""
    if isinstance(schedule, VPDiscrete):
        return (timestep + 1) / 1000
    return schedule.unshift(timestep / 1000)


class GaussianX0(Backbone):
    """Exact E[x0 | x_t] (an ``x0`` prediction) for data x0 ~ N(m + c, s²·I) elementwise.

    ``m`` is a tensor broadcastable to (C, T, H, W) or a callable returning one; ``c`` is the
    caption's first token value, so that conditioning and CFG have an analytic effect.
    """

    def __init__(self, schedule, m, s=1.0):
        super().__init__()
        self.schedule, self.s, self._m = schedule, s, m

    def mean(self):
        return self._m() if callable(self._m) else self._m

    def forward(self, x, timestep, cond):
        t = model_time(self.schedule, timestep).to(x.dtype)
        a = self.schedule.alpha(t).reshape(-1, 1, 1, 1, 1)
        sig = self.schedule.sigma(t).reshape(-1, 1, 1, 1, 1)
        m = self.mean() + cond.context[:, 0, 0].reshape(-1, 1, 1, 1, 1).to(x.dtype)
        return m + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * m)


@dataclass
class FakeRole:
    """What objectives see of a role (engine.roles.Role)."""

    name: str
    module: nn.Module
    ema: nn.Module | None = None
    trainable: bool = True

    @property
    def ema_module(self):
        return self.ema if self.ema is not None else self.module


def make_ctx(batch_size, role="student", step=0, seed=0, times="dollar4", sampler="consistency", stored=None):
    """A step context whose student generator samples on ``times`` (the ``generator:`` block), snapped to
    ``stored`` times when given."""
    student = StudentGenerator(GeneratorConfig(times=times, sampler=sampler, snap_to_data=stored is not None), stored)
    return StepContext(step=step, stage=0, stage_step=step, role=role, seed=seed, device=torch.device("cpu"),
                       sample_ids=torch.arange(batch_size), generator=torch.Generator().manual_seed(0),
                       student=student)


def const_cond(batch_size, value=0.0, dtype=F64):
    return Conditioning(torch.full((batch_size, 1, 1), value, dtype=dtype))


def make_batch(latents, cond_value=0.0, prompts=None):
    b = latents.shape[0]
    return Batch(latents=latents, cond=const_cond(b, cond_value, latents.dtype),
                 uncond=const_cond(b, 0.0, latents.dtype), prompts=prompts or ["a red circle"] * b,
                 sample_ids=torch.arange(b))


def tiny_setup(batch_size=2, seed=0):
    """Tiny toy-DiT pipeline, a batch of random latents with real captions."""
    pipe = make_tiny_pipeline(seed)
    prompts = ["a red circle moves left", "a blue square moves up", "a red circle moves left",
               "a green triangle moves right"][:batch_size]
    latents = torch.randn(pipe.latent_shape(batch_size), generator=torch.Generator().manual_seed(seed))
    batch = Batch(latents=latents, cond=pipe.encode_prompts(prompts), uncond=pipe.null_condition(batch_size),
                  prompts=prompts, sample_ids=torch.arange(batch_size))
    return pipe, batch


def engine_config(roles, objectives, generator=None):
    """An EngineConfig with ``roles`` (name → trainable), one stage listing ``objectives``, a ``generator:``."""
    specs = {name: ({"optim": {"lr": 1e-4}} if trainable else {}) for name, trainable in roles.items()}
    return parse_config(EngineConfig, {"roles": specs, "stages": {"main": {"objectives": objectives}},
                                       **({"generator": generator} if generator is not None else {})})


# ---------------------------------------------------------------------------------------------
# Engine runs: the CLI in- and out-of-process, and readers of a run directory
# ---------------------------------------------------------------------------------------------

#: A cheap finetune run: tiny batch, every step logged, no evaluation, TensorBoard off.
TINY = ["train.steps=4", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=0", "train.tensorboard=false", "roles.student.optim.warmup_steps=2",
        "roles.student.optim.lr=1e-3", "train.eval_steps=[2]"]


def sets(teacher: Path, *extra: str) -> list[str]:
    """``--set`` arguments: the tiny run on ``teacher`` plus ``extra`` overrides."""
    out = []
    for item in [f"model={teacher}", *TINY, *extra]:
        out += ["--set", item]
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``fewstep`` in-process: exit code, stdout, stderr."""
    from fewstep.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_subprocess(*argv, env=None, launcher=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "fewstep.cli", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """``step → {loss/... : value}`` from metrics.jsonl (training records only)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        vals = {k: v for k, v in rec.items() if k.startswith(("loss/", "grad_norm/", "lr/"))}
        if vals:
            out[rec["step"]] = vals
    return out


def tensors(run_dir: Path, step: int, stem: str = "roles/student") -> dict:
    return load_file(Path(run_dir) / "checkpoints" / f"step_{step:06d}" / f"{stem}.safetensors")


def trainer_state(run_dir: Path, step: int) -> dict:
    return json.loads((Path(run_dir) / "checkpoints" / f"step_{step:06d}" / "trainer.json").read_text())


def assert_same_checkpoint(run, reference, step: int, must: tuple[str, ...] = ("roles/student",)) -> None:
    """``run``'s checkpoint of ``step`` equals ``reference``'s bit for bit — every tensor file it holds
    (``must`` among them), the roles' update counts — and so does every logged loss."""
    where = Path(reference) / "checkpoints" / f"step_{step:06d}"
    stems = sorted(str(p.relative_to(where).with_suffix("")) for p in where.glob("*/*.safetensors"))
    assert set(must) <= set(stems), stems
    for stem in stems:
        got, want = tensors(run, step, stem), tensors(reference, step, stem)
        assert got.keys() == want.keys(), stem
        for k in want:
            assert torch.equal(got[k], want[k]), f"{stem}:{k}"
    assert trainer_state(run, step)["roles"] == trainer_state(reference, step)["roles"]
    assert losses(run) == losses(reference)


# ---------------------------------------------------------------------------------------------
# Exact resume: the run both the resume and the signal tests compare against
# ---------------------------------------------------------------------------------------------

STEPS = 6
#: two roles with different cadence, EMA, warm-up, caption dropout: everything resume must restore
RUN = ["train.steps=6", "roles.fake_score.optim.lr=1e-3", "roles.fake_score.every=2",
       "stages.finetune.objectives.critic.kind=flow_matching", "stages.finetune.objectives.critic.role=fake_score",
       "roles.student.optim.warmup_steps=4"]


def assert_same_end(run, reference):
    for stem in ("roles/student", "ema/student", "optim/student", "roles/fake_score", "optim/fake_score"):
        got, want = tensors(run, STEPS, stem), tensors(reference, STEPS, stem)
        assert got.keys() == want.keys(), stem
        for k in want:
            assert torch.equal(got[k], want[k]), f"{stem}:{k}"
    assert trainer_state(run, STEPS)["roles"] == trainer_state(reference, STEPS)["roles"]
    assert losses(run) == losses(reference)  # every logged loss, grad norm and LR, bit for bit


# ---------------------------------------------------------------------------------------------
# Tiny random diffusers pipelines, built here (nothing downloaded)
# ---------------------------------------------------------------------------------------------

#: Words of the tiny tokenizers: the toy world's vocabulary and a few more.
TINY_WORDS = ("a red green blue yellow white magenta circle square triangle cross moves left right up down "
              "quickly slowly on dark light background stays still cat dog runs in the park blurry").split()


def tiny_t5_tokenizer():
    """A T5/UMT5 tokenizer built in memory from :data:`TINY_WORDS` (transformers 5: no sentencepiece file)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -float(i)) for i, w in enumerate(TINY_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_wan_pipeline(directory, *, frames=9, size=32, seed=0, max_sequence_length=16, cfg_scale=5.0):
    """Save a tiny random ``WanPipeline`` (UMT5, AutoencoderKLWan with non-trivial latents_mean/std, a
    2-block Wan transformer, FlowMatchEuler with shift 3) and fewstep's settings for a small clip."""
    import json

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    perturb(transformer, seed=seed)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(directory)
    settings = {"frames": frames, "height": size, "width": size, "max_sequence_length": max_sequence_length,
                "sampling": {"sampler": "euler", "steps": 4, "cfg_scale": cfg_scale, "spacing": "diffusers"}}
    (Path(directory) / "fewstep_model.json").write_text(json.dumps(settings))
    return Path(directory)


def make_tiny_wan22_pipeline(directory, *, boundary_ratio=0.875, shift=3.0, cfg_scale=4.0, steps=6,
                             guidance_scale_2=None):
    """Save a tiny random Wan 2.2 ``WanPipeline``: the tiny Wan's text encoder and VAE, two 2-block experts with
    different random weights (``transformer`` high noise, ``transformer_2`` low noise) and ``boundary_ratio``;
    the default 6-step grid crosses the boundary (timesteps 1000, 923, 819 < 875, …)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    directory = Path(directory)
    wan = make_tiny_wan_pipeline(directory.with_name(directory.name + "-wan21"))
    base = WanPipeline.from_pretrained(wan, local_files_only=True)

    def expert(seed):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel.from_config(base.transformer.config)
        return perturb(transformer, seed=seed)

    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=expert(1),
                       transformer_2=expert(2), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                       boundary_ratio=boundary_ratio)
    pipe.save_pretrained(directory)
    settings = {"frames": 9, "height": 32, "width": 32, "max_sequence_length": 16, "guidance_scale_2": guidance_scale_2,
                "sampling": {"sampler": "euler", "steps": steps, "cfg_scale": cfg_scale, "spacing": "diffusers"}}
    (directory / "fewstep_model.json").write_text(json.dumps(settings))
    return directory


def _tiny_bpe(prefix: str = "", suffix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and merges that spell each word of :data:`TINY_WORDS` (``prefix + word + suffix``) as
    one token: every character is a token, and each word grows left to right by one merge per character."""
    chars = sorted({c for w in TINY_WORDS for c in w})
    vocab: dict[str, int] = {}
    for symbol in ([prefix] if prefix else []) + chars + ([c + suffix for c in chars] if suffix else []):
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = ([prefix] if prefix else []) + list(word[:-1]) + [word[-1] + suffix]
        token = pieces[0]
        for piece in pieces[1:]:
            if (token, piece) not in merges:
                merges.append((token, piece))
            token += piece
            vocab.setdefault(token, len(vocab))
    return vocab, merges


def tiny_llama_tokenizer():
    """A Llama tokenizer built in memory from :data:`TINY_WORDS` (right padding, as HunyuanVideo's)."""
    from transformers import LlamaTokenizer

    words, merges = _tiny_bpe(prefix="▁")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for token in words:
        vocab.setdefault(token, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", padding_side="right")


def tiny_clip_tokenizer():
    """A CLIP tokenizer built in memory from :data:`TINY_WORDS`."""
    from transformers import CLIPTokenizer

    words, merges = _tiny_bpe(suffix="</w>")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in words:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_tiny_cogvideox_pipeline(directory, *, frames=9, size=16, seed=0, max_sequence_length=16, cfg_scale=6.0,
                                 patch_size_t=None, scheduler="ddim"):
    """Save a tiny random ``CogVideoXPipeline`` (T5, a 3-level AutoencoderKLCogVideoX: 4× space, 4× time, a
    2-block transformer with rotary embeddings; ``patch_size_t=2`` makes it a CogVideoX 1.5) with CogVideoX's
    scheduler settings (v-prediction, trailing, zero terminal SNR, SNR shift 3), and fewstep's settings."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                           num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
                                              sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                                              patch_size_t=patch_size_t, temporal_compression_ratio=4,
                                              max_text_seq_length=max_sequence_length,
                                              use_rotary_positional_embeddings=True)
    perturb(transformer, seed=seed)
    kind = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=kind(prediction_type="v_prediction", timestep_spacing="trailing",
                                            rescale_betas_zero_snr=True, snr_shift_scale=3.0))
    pipe.save_pretrained(directory)
    settings = {"frames": frames, "height": size, "width": size, "max_sequence_length": max_sequence_length,
                "sampling": {"sampler": "ddim", "steps": 4, "cfg_scale": cfg_scale, "spacing": "diffusers"}}
    (Path(directory) / "fewstep_model.json").write_text(json.dumps(settings))
    return Path(directory)


#: A plain prompt template for the tiny HunyuanVideo (its default is written for Llama 3's tokenizer).
TINY_PROMPT_TEMPLATE = {"template": "background {}", "crop_start": 1}


def make_tiny_hunyuan_pipeline(directory, *, frames=9, size=16, seed=0, max_sequence_length=16, shift=7.0):
    """Save a tiny random ``HunyuanVideoPipeline`` (Llama + CLIP, a 3-level AutoencoderKLHunyuanVideo: 4× space,
    4× time, a guidance-distilled transformer with one double and one single block), FlowMatchEuler with
    ``shift``, and fewstep's settings with :data:`TINY_PROMPT_TEMPLATE`."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_attention_heads=4, num_hidden_layers=3, pad_token_id=3, bos_token_id=1,
                                          eos_token_id=2))
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=16,
                                                  num_attention_heads=2, num_hidden_layers=1, bos_token_id=0,
                                                  eos_token_id=1, pad_token_id=1, max_position_embeddings=77))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4))
    perturb(transformer, seed=seed)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=text_encoder_2,
                                tokenizer_2=tokenizer_2)
    pipe.save_pretrained(directory)
    settings = {"frames": frames, "height": size, "width": size, "max_sequence_length": max_sequence_length,
                "prompt_template": TINY_PROMPT_TEMPLATE,
                "sampling": {"sampler": "euler", "steps": 4, "cfg_scale": 1.0, "spacing": "uniform"}}
    (Path(directory) / "fewstep_model.json").write_text(json.dumps(settings))
    return Path(directory)


def make_tiny_dinov2(directory):
    """Save a tiny random ``Dinov2Model`` (1 layer, width 16, 32² images in 8² patches): a feature model for
    Fréchet distances (eval/generic.py)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).save_pretrained(directory)
    return Path(directory)


#: Widths of the tiny CLIP / X-CLIP reward models (32² images in 8² patches).
TINY_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, bos_token_id=0,
                      eos_token_id=1, pad_token_id=1, max_position_embeddings=32)
TINY_CLIP_VISION = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                        patch_size=8)


def make_tiny_clip(directory, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3)):
    """Save a tiny random ``CLIPModel`` with its tokenizer and image processor (a stand-in for HPSv2 / CLIP)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    model = CLIPModel(CLIPConfig(text_config={**TINY_CLIP_TEXT, "vocab_size": len(tokenizer)},
                                 vision_config=TINY_CLIP_VISION, projection_dim=8))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(image_mean),
                       image_std=list(image_std)).save_pretrained(directory)
    return Path(directory)


def make_tiny_xclip(directory, num_frames=4):
    """Save a tiny random ``XCLIPModel`` (video–text) with its tokenizer."""
    from transformers import XCLIPConfig, XCLIPModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    vision = {**TINY_CLIP_VISION, "num_frames": num_frames, "mit_hidden_size": 8, "mit_intermediate_size": 16,
              "mit_num_attention_heads": 2}
    model = XCLIPModel(XCLIPConfig(text_config={**TINY_CLIP_TEXT, "vocab_size": len(tokenizer)}, vision_config=vision,
                                   projection_dim=8, prompt_layers=1, prompt_num_attention_heads=2))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def assert_runs_match(one, two, step: int, stems=("roles/student", "ema/student", "roles/fake_score")) -> dict:
    """Run ``two`` (e.g. FSDP on 2 processes) logged the losses of run ``one`` step by step, and its checkpoint of
    ``step`` holds the same tensors under ``stems``; returns ``stem → tensors`` of ``one`` for further checks."""
    import pytest
    import torch

    want, got = losses(one), losses(two)
    assert sorted(got) == sorted(want)
    for s in want:
        for key, value in want[s].items():
            assert got[s][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (s, key)
    found = {}
    for stem in stems:
        a, b = tensors(one, step, stem), tensors(two, step, stem)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        found[stem] = a
    return found
