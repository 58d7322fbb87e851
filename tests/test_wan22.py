"""Wan 2.2's two experts as one teacher, on a tiny random Wan 2.2 ``WanPipeline`` built here (two experts with
different random weights, ``boundary_ratio`` 0.875): each sample goes to the expert of its own timestep (a mixed
batch against each transformer called directly), the low-noise expert's own CFG scale, sampling across the
boundary equals diffusers' ``WanPipeline``, the block-wise JVP over a mixed batch, LoRA / FSDP2 units / gradient
checkpointing per expert; bad input is one line with exit 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fewstep.engine.distributed import compute_root, shard_units
from fewstep.engine.lora import block_linears
from fewstep.engine.roles import enable_gradient_checkpointing
from fewstep.models.backbones import Conditioning
from fewstep.models.experts import ExpertBackbone
from fewstep.models.family import load_model
from helpers import cli, make_tiny_wan22_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a cat runs in the park"
BOUNDARY = 875.0  # boundary_ratio 0.875 × 1000 train timesteps


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    return make_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "wan22")


@pytest.fixture(scope="module")
def diffusers_wan22(wan22_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan22_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mixed_batch(model, seed=0):
    """Four samples, times on both sides of the boundary: (x, t, cond, uncond, model timesteps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(model.latent_shape(4), generator=g)
    t = torch.tensor([0.9, 0.3, 0.75, 0.05])  # σ = 0.964, 0.563, 0.9, 0.136 with shift 3: high, low, high, low
    cond = model.encode_prompts([PROMPT, "a dog runs", "a red circle moves left", PROMPT])
    uncond = model.null_condition(4)
    return x, t, cond, uncond, model.denoiser.schedule.model_timestep(t)


def test_both_experts_load_lazily_and_form_one_routed_denoiser(wan22_dir):
    model = load_model(wan22_dir)
    assert {"transformer", "transformer_2"} <= set(model.lazy)  # nothing loaded yet
    assert model.expert_slots == ["transformer", "transformer_2"]
    router = model.denoiser.backbone
    assert isinstance(router, ExpertBackbone) and router.boundaries == [BOUNDARY]
    assert "transformer" not in model.lazy and "transformer_2" not in model.lazy
    assert router.experts["transformer"].model is model.transformer
    assert router.experts["transformer_2"].model is model.transformer_2
    experts = model.denoisers()
    assert list(experts) == ["transformer", "transformer_2"]
    assert experts["transformer"].backbone is router.experts["transformer"]  # views sharing the weights
    high, low = (dict(e.named_parameters()) for e in experts.values())
    assert any(not torch.equal(high[k], low[k]) for k in high)  # different random experts


def test_each_sample_goes_to_the_expert_of_its_timestep(wan22_dir):
    """A mixed batch split and re-assembled equals each transformer called directly on its samples, and differs
    from the other expert's output (so a mis-routed sample would be caught)."""
    model = load_model(wan22_dir)
    x, t, cond, _, timestep = mixed_batch(model)
    assert model.denoiser.backbone.route(timestep).tolist() == [0, 1, 0, 1]
    on_edge = torch.tensor([BOUNDARY, BOUNDARY - 1e-3, 1000.0, 0.0])  # t ≥ boundary: the high-noise expert
    assert model.denoiser.backbone.route(on_edge).tolist() == [0, 1, 0, 1]

    def direct(transformer, i):
        return transformer(hidden_states=x[i:i + 1], timestep=timestep[i:i + 1],
                           encoder_hidden_states=cond.context[i:i + 1], return_dict=False)[0]

    with torch.no_grad():
        out = model.denoiser(x, t, cond)  # raw flow output (B, C, T, H, W)
        for i, (right, wrong) in enumerate([("transformer", "transformer_2"), ("transformer_2", "transformer"),
                                            ("transformer", "transformer_2"), ("transformer_2", "transformer")]):
            want = direct(getattr(model, right), i)
            torch.testing.assert_close(out[i:i + 1], want, rtol=1e-5, atol=1e-6)
            assert (direct(getattr(model, wrong), i) - want).abs().max() > 1e-3
        one_side = model.denoiser(x[[0, 2]], t[[0, 2]], cond.index(torch.tensor([0, 2]))) # no split needed
    torch.testing.assert_close(one_side, out[[0, 2]], rtol=1e-5, atol=1e-6)


def test_the_low_noise_expert_guides_with_its_own_scale(wan22_dir):
    """CFG uncond + w·(cond − uncond) with w = cfg_scale for high-noise samples and guidance_scale_2 for low-noise
    ones, against each expert alone with its scale; without guidance_scale_2 both use the call's scale."""
    model = load_model(wan22_dir)
    x, t, cond, uncond, _ = mixed_batch(model)
    experts = model.denoisers()
    router = model.denoiser.backbone
    high, low = torch.tensor([0, 2]), torch.tensor([1, 3])
    for scale_2 in (None, 1.5):
        router.expert_cfg_scales = [None, scale_2]
        with torch.no_grad():
            got = model.denoiser.predict(x, t, cond, cfg_scale=4.0, uncond=uncond).x0
            want_high = experts["transformer"].predict(x[high], t[high], cond.index(high), cfg_scale=4.0,
                                                       uncond=uncond.index(high)).x0
            want_low = experts["transformer_2"].predict(x[low], t[low], cond.index(low),
                                                        cfg_scale=4.0 if scale_2 is None else scale_2,
                                                        uncond=uncond.index(low)).x0
        torch.testing.assert_close(got[high], want_high, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[low], want_low, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the scale matters: 1.5 and 4 give different low-noise predictions
        other = experts["transformer_2"].predict(x[low], t[low], cond.index(low), cfg_scale=4.0,
                                                 uncond=uncond.index(low)).x0
    assert (other - want_low).abs().max() > 1e-4


@pytest.mark.parametrize("cfg,cfg_2", [(1.0, None), (4.0, None), (4.0, 2.0)])
def test_sampling_across_the_boundary_matches_diffusers(wan22_dir, diffusers_wan22, cfg, cfg_2):
    """Euler on the diffusers grid, 6 steps (timesteps 1000, 923 | 819, 668, 432, 9): WanPipeline's latents, with
    guidance_scale and guidance_scale_2."""
    model = load_model(wan22_dir)
    noise = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(1))
    ours = model.sample_latents([PROMPT], cfg_scale=cfg, cfg_scale_2=cfg_2, noise=noise).x
    kwargs = {} if cfg_2 is None else {"guidance_scale_2": cfg_2}
    theirs = diffusers_wan22(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=6, guidance_scale=cfg,
                             latents=noise.clone(), max_sequence_length=16, output_type="latent", **kwargs).frames
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05
    if cfg_2 is not None:  # guidance_scale_2 in fewstep_model.json: the same samples without the argument
        assert model.denoiser.backbone.expert_cfg_scales == [None, None]  # the argument held for its call only
        settled = model.with_settings(model.settings.model_copy(update={"guidance_scale_2": cfg_2}))
        torch.testing.assert_close(settled.sample_latents([PROMPT], cfg_scale=cfg, noise=noise).x, ours, rtol=0, atol=0)


def test_the_blockwise_jvp_splits_a_mixed_batch(wan22_dir):
    """SwiftVideo Alg. 2 over a batch routed to both experts: the value and tangent of the whole-model JVP."""
    model = load_model(wan22_dir)
    denoiser = copy.deepcopy(model.denoiser).double()
    x, t, cond, uncond, _ = mixed_batch(model)
    x, t = x.double(), t.double()
    cond, uncond = cond.to(torch.float64), uncond.to(torch.float64)
    g = torch.Generator().manual_seed(5)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    with torch.no_grad():
        for cfg in ({}, {"cfg_scale": 3.0, "uncond": uncond}):
            value, tangent = denoiser.jvp(x, t, cond, tx, tt, output="x0", method="autograd", **cfg)
            value_b, tangent_b = denoiser.jvp(x, t, cond, tx, tt, output="x0", method="blockwise", **cfg)
            assert tangent.abs().max() > 1e-3
            torch.testing.assert_close(value_b, value, rtol=0, atol=1e-10)
            torch.testing.assert_close(tangent_b, tangent, rtol=1e-9, atol=1e-9)


def test_lora_fsdp_units_and_checkpointing_cover_both_experts(wan22_dir):
    model = load_model(wan22_dir)
    denoiser = model.denoiser
    names = block_linears(denoiser)  # LoRA's default targets: the Linear layers of each expert's blocks
    for slot in ("transformer", "transformer_2"):
        mine = [n for n in names if n.startswith(f"backbone.experts.{slot}.model.blocks.")]
        assert any(n.endswith("attn1.to_q") for n in mine) and any(".ffn." in n for n in mine)
    assert all(".blocks." in n for n in names)  # no embedder or output layer
    root = compute_root(denoiser)
    assert root is denoiser.backbone
    units = shard_units(root)
    blocks = [*model.transformer.blocks, *model.transformer_2.blocks]
    assert all(any(u is b for u in units) for b in blocks)  # FSDP2 shards both experts' blocks
    where = {id(u): i for i, u in enumerate(units)}
    for transformer in (model.transformer, model.transformer_2):  # each expert after its blocks, the root last
        assert all(where[id(b)] < where[id(transformer)] for b in transformer.blocks)
    assert units[-1] is root and len(units) == len(blocks) + 3
    assert enable_gradient_checkpointing(copy.deepcopy(denoiser)) == 2
    assert {p.dtype for p in copy.deepcopy(denoiser).to(torch.bfloat16).parameters()} == {torch.bfloat16}


def test_guidance_scale_2_on_a_one_transformer_wan_is_one_line(wan_dir, tmp_path, capsys):
    model_dir = tmp_path / "wan"
    import shutil
    shutil.copytree(wan_dir, model_dir)
    settings = json.loads((model_dir / "fewstep_model.json").read_text())
    (model_dir / "fewstep_model.json").write_text(json.dumps({**settings, "guidance_scale_2": 2.0}))
    rc, _, err = cli(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--out", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "guidance_scale_2 applies to a two-expert" in err, err
    assert not (tmp_path / "out").exists()


def test_a_boundary_without_a_second_expert_is_one_line(wan22_dir, tmp_path, capsys):
    import shutil
    model_dir = tmp_path / "wan22"
    shutil.copytree(wan22_dir, model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    (model_dir / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None]}))
    shutil.rmtree(model_dir / "transformer_2")
    rc, _, err = cli(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--out", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "no transformer_2" in err, err


def test_block_features_come_from_each_samples_expert(wan22_dir):
    """extract_features (the teacher-feature discriminators' input) on a mixed batch: block i of the expert each
    sample goes to, as each expert alone gives it."""
    from fewstep.models.features import extract_features

    model = load_model(wan22_dir)
    x, t, cond, _, _ = mixed_batch(model)
    experts = model.denoisers()
    with torch.no_grad():
        got = extract_features(model.denoiser, x, t, cond, [0, -1])
        for name, idx in (("transformer", torch.tensor([0, 2])), ("transformer_2", torch.tensor([1, 3]))):
            want = extract_features(experts[name], x[idx], t[idx], cond.index(idx), [0, -1])
            for g, w in zip(got, want):
                torch.testing.assert_close(g[idx], w, rtol=1e-5, atol=1e-6)
    assert got[0].shape[0] == 4


def test_caching_latents_never_loads_an_expert(wan22_dir, tmp_path, capsys, monkeypatch):
    """fewstep cache encodes captions and clips; neither expert is loaded."""
    from fewstep.models.diffusers_family import DiffusersVideoModel

    loaded, real = [], DiffusersVideoModel.component

    def component(self, name):
        loaded.append(name)
        return real(self, name)

    monkeypatch.setattr(DiffusersVideoModel, "component", component)
    (tmp_path / "p.txt").write_text("a cat runs in the park\na dog runs\n")
    rc, _, err = cli(capsys, "cache", "--model", wan22_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "text_encoder" in loaded and "transformer" not in loaded and "transformer_2" not in loaded


@pytest.mark.parametrize("grid", ["fitted", "plain"])
def test_the_exported_boundary_routes_each_step_to_its_student(tmp_path, grid):
    """Student steps σ = 1, 0.9 | 0.75, 0.5 with the teacher's boundary_ratio 0.9: the export's fitted scheduler
    visits them and keeps 0.9; a plain FlowMatchEuler(shift 3) grid (σ = 1, 0.857, …) would hand step 1 to the
    low-noise student, so the export moves the boundary between the two students' steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.export import _flow_scheduler, _route_experts

    model = load_model(make_tiny_wan22_pipeline(tmp_path / "wan22", boundary_ratio=0.9))
    times = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)  # σ = 1, 0.9, 0.75, 0.5 at shift 3
    if grid == "fitted":
        scheduler = _flow_scheduler(model.denoiser.schedule, "consistency", times, "WanPipeline")[0]
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    got = _route_experts(model, times, scheduler)
    assert got["steps"] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    scheduler.set_timesteps(4)
    tau = scheduler.timesteps.float()
    routed = ["transformer" if t >= got["boundary_ratio"] * 1000 else "transformer_2" for t in tau]  # WanPipeline
    assert routed == got["steps"]
    assert (tau[1] >= 900) == (grid == "fitted") and (got["boundary_ratio"] == 0.9) == (grid == "fitted")


def test_generate_takes_the_low_noise_experts_scale(wan22_dir, wan_dir, tmp_path, capsys):
    """fewstep generate --cfg-2 equals guidance_scale_2 in fewstep_model.json and changes the samples; a model
    with one transformer refuses it in one line."""
    import shutil

    import numpy as np

    def frames(model, out, *extra):
        rc, _, err = cli(capsys, "generate", "--model", model, "--prompt", PROMPT, "--out", out, "--cfg", "4", *extra)
        assert rc == 0, err
        return np.load(out / "samples.npz")["frames"]

    flag = frames(wan22_dir, tmp_path / "flag", "--cfg-2", "1.5")
    settled = tmp_path / "settled"
    shutil.copytree(wan22_dir, settled)
    settings = json.loads((settled / "fewstep_model.json").read_text())
    (settled / "fewstep_model.json").write_text(json.dumps({**settings, "guidance_scale_2": 1.5}))
    np.testing.assert_array_equal(frames(settled, tmp_path / "settled_out"), flag)
    assert (frames(wan22_dir, tmp_path / "plain").astype(int) - flag).any()
    rc, _, err = cli(capsys, "generate", "--model", wan_dir, "--prompt", PROMPT, "--out", tmp_path / "one",
                     "--cfg-2", "2")
    assert rc == 2 and err.count("\n") == 1 and "--cfg-2" in err, err
    assert not (tmp_path / "one").exists()


def test_eval_takes_the_low_noise_experts_scale(wan22_dir, tmp_path, capsys):
    """fewstep eval --cfg-2 reaches the sampler (it changes the metrics of the same noise); a toy model refuses it
    in one line."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")

    def sharpness(out, *extra):
        rc, _, err = cli(capsys, "eval", "--model", wan22_dir, "--prompts", prompts, "--out", out, "--cfg", "4",
                         "--num", "1", *extra)
        assert rc == 0, err
        return json.loads((out / "metrics.json").read_text())["sharpness"]

    assert sharpness(tmp_path / "flag", "--cfg-2", "1.5") != sharpness(tmp_path / "plain")
    rc, _, err = cli(capsys, "eval", "--model", "toy-teacher", "--out", tmp_path / "toy", "--cfg-2", "2")
    assert rc == 2 and err.count("\n") == 1 and "--cfg-2" in err, err
    assert not (tmp_path / "toy").exists()
