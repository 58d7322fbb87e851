"""Distilling a tiny random Wan 2.2 (two experts, built here) in both student layouts, by config alone:

* ``per_expert`` (no ``build``: the student is a copy of the routed teacher): one student per expert, each trained
  on the student steps on its side of the boundary, the high-noise student's output handed to the low-noise one;
* ``single`` (``roles.student.build: {kind: expert}``): one network for every step, from the high-noise expert.

The fake score routes by t in both. A 10-step DOLLAR run (VSD + CD + the fake score) stopped at 5 and resumed
equals the uninterrupted run bit for bit; ``fewstep export`` writes a Wan 2.2 pipeline (``transformer``,
``transformer_2``, ``boundary_ratio``) that diffusers' ``WanPipeline`` samples as ``fewstep generate --model
RUN/student`` does from the same noise."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.models.family import load_model
from helpers import assert_runs_match, assert_same_checkpoint, cli, losses, make_tiny_wan22_pipeline, tensors

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
PROMPT = "a cat runs in the park"
#: layout → overrides; uniform4 (t = 1, 0.75, 0.5, 0.25; σ = 1, 0.9 | 0.75, 0.5 at shift 3) is a stock grid
LAYOUTS = {"per_expert": [], "single": ["roles.student.build={kind: expert}"]}


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    return make_tiny_wan22_pipeline(tmp_path_factory.mktemp("wan22") / "wan22")


def run_args(model, out, layout, *extra, recipe="dollar"):
    sets = [f"model={model}", f"train.steps={STEPS}", "train.batch_size=2", "train.eval_every=0",
            "train.checkpoint_every=5", "train.log_every=1", "train.tensorboard=false", "roles.student.every=2",
            "generator.times=uniform4", *LAYOUTS[layout], *extra]
    return ["distill", "--recipe", recipe, "--out", out, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def reference_runs(wan22_dir, tmp_path_factory):
    """The uninterrupted runs (one thread, as the tests: a thread count changes float sums)."""
    from fewstep.cli import main

    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layout in LAYOUTS:
            runs[layout] = tmp_path_factory.mktemp("ref") / layout
            assert main(run_args(wan22_dir, runs[layout], layout)) == 0
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_exact(layout, wan22_dir, reference_runs, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *run_args(wan22_dir, run, layout, "train.steps=5"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}")
    assert rc == 0, err
    assert_same_checkpoint(run, reference_runs[layout], STEPS, must=("roles/student", "optim/student",
                                                                     "roles/fake_score"))
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


def changed(weights, teacher, prefix):
    return [k for k, v in weights.items() if not torch.equal(v, teacher[prefix + k.split("model.", 1)[1]])]


def test_per_expert_trains_one_student_per_expert(wan22_dir, reference_runs):
    """Both experts of the student and of the fake score train (the student's steps lie on both sides)."""
    teacher = load_model(wan22_dir)
    base = {slot: getattr(teacher, slot).state_dict() for slot in teacher.expert_slots}
    for stem in ("roles/student", "roles/fake_score"):
        weights = tensors(reference_runs["per_expert"], STEPS, stem)
        for slot in ("transformer", "transformer_2"):
            mine = {k: v for k, v in weights.items() if k.startswith(f"backbone.experts.{slot}.model.")}
            assert len(mine) == len(base[slot])
            assert changed(mine, base[slot], ""), (stem, slot)
    student = load_model(reference_runs["per_expert"] / "student")
    assert student.expert_slots == ["transformer", "transformer_2"]
    assert student.denoiser is not None and not student.same_experts()


def test_single_trains_one_network_for_both_slots(wan22_dir, reference_runs):
    teacher = load_model(wan22_dir)
    weights = tensors(reference_runs["single"], STEPS, "roles/student")
    assert all(k.startswith("backbone.model.") for k in weights)  # one network, not routed
    assert changed(weights, teacher.transformer.state_dict(), "")
    fake = tensors(reference_runs["single"], STEPS, "roles/fake_score")  # the fake score still routes by t
    assert any(k.startswith("backbone.experts.transformer_2.") for k in fake)
    student_dir = reference_runs["single"] / "student"
    student = load_model(student_dir)
    assert not student.same_experts() and student.denoiser is not None  # (not loaded yet: unknown)
    assert student.same_experts()
    high, low = (student_dir / slot / "diffusion_pytorch_model.safetensors"
                 for slot in ("transformer", "transformer_2"))
    assert high.stat().st_ino == low.stat().st_ino  # one file on disk, in both slots
    ema = tensors(reference_runs["single"], STEPS, "ema/student")
    for k, v in student.transformer.state_dict().items():
        assert torch.equal(v, ema[f"backbone.model.{k}"])


def diffusers_latents(directory, noise, steps, seed):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)  # WanPipeline's scheduler.step draws consistency noise from the global generator
    return pipe(PROMPT, height=32, width=32, num_frames=9, num_inference_steps=steps, guidance_scale=1.0,
                latents=noise.clone(), max_sequence_length=16, output_type="latent").frames


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_export_samples_in_diffusers_as_fewstep_generate(layout, reference_runs, tmp_path, capsys):
    run, out = reference_runs[layout], tmp_path / "export"
    rc, stdout, err = cli(capsys, "export", run, "--out", out)
    assert rc == 0, err
    assert "num_inference_steps=4, guidance_scale=1.0" in stdout and "note:" not in stdout
    record = json.loads((out / "export.json").read_text())
    assert record["exact"]
    assert record["experts"]["steps"] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert record["experts"]["same_student"] == (layout == "single")
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.875
    student = load_model(run / "student")
    noise = torch.randn(student.latent_shape(1), generator=torch.Generator().manual_seed(3))
    ours = student.sample_latents([PROMPT], noise=noise, seed=7).x
    theirs = diffusers_latents(out, noise, 4, seed=7)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert float((ours - noise).abs().mean()) > 0.05
    exported = load_model(out)  # fewstep reads the export too
    torch.testing.assert_close(exported.sample_latents([PROMPT], noise=noise, seed=7).x, ours, rtol=1e-4, atol=1e-4)
    if layout == "per_expert":  # the two students differ: routing a step to the other one changes the sample
        high = load_model(out)
        high.denoiser.backbone.boundaries = [0.0]  # every step to the high-noise student
        other = high.sample_latents([PROMPT], noise=noise, seed=7).x
        assert (other - ours).abs().max() > 1e-3


def test_an_unknown_expert_is_one_line(wan22_dir, tmp_path, capsys):
    argv = run_args(wan22_dir, tmp_path / "run", "single", "roles.student.build.expert=transformer_3")
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "transformer_3" in err and "transformer_2" in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lora_runs(wan22_dir, tmp_path_factory):
    """2-step LoRA runs of both layouts (the teacher's frozen base shared; adapters trained)."""
    from fewstep.cli import main

    lora = ["roles.student.lora.rank=4", "roles.student.lora.alpha=8", "roles.fake_score.lora.rank=4",
            "roles.student.every=1", "train.steps=2", "train.checkpoint_every=2"]
    runs = {}
    for layout in LAYOUTS:
        runs[layout] = tmp_path_factory.mktemp("lora") / layout
        assert main(run_args(wan22_dir, runs[layout], layout, *lora)) == 0
    return runs


def forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 16, 16, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=context,
                           return_dict=False)[0]


def test_lora_only_export_writes_one_file_per_expert(wan22_dir, lora_runs, tmp_path, capsys):
    """--lora-only of a per-expert LoRA student: the high-noise adapters in diffusers' default file, the low-noise
    ones in a second that WanPipeline.load_lora_weights(..., load_into_transformer_2=True) reads; the teacher with
    both equals RUN/student (base + merged adapters) expert by expert."""
    from diffusers import WanPipeline

    out = tmp_path / "lora"
    rc, _, err = cli(capsys, "export", lora_runs["per_expert"], "--out", out, "--lora-only")
    assert rc == 0, err
    experts = json.loads((out / "export.json").read_text())["lora"]["experts"]
    assert experts["transformer"]["layers"] == experts["transformer_2"]["layers"] > 0
    pipe = WanPipeline.from_pretrained(wan22_dir, local_files_only=True)
    pipe.load_lora_weights(out)
    pipe.load_lora_weights(out, weight_name=experts["transformer_2"]["weight_name"], load_into_transformer_2=True)
    student = load_model(lora_runs["per_expert"] / "student")
    teacher = load_model(wan22_dir)
    for slot in ("transformer", "transformer_2"):
        want = forward(student.component(slot))
        torch.testing.assert_close(forward(getattr(pipe, slot)), want, rtol=1e-4, atol=1e-5)
        assert (forward(teacher.component(slot)) - want).abs().max() > 1e-6  # the adapters trained


def test_a_single_lora_student_merges_into_its_expert(wan22_dir, lora_runs):
    """The single layout's LoRA adapters merge into the high-noise expert's weights, in both slots of RUN/student."""
    from fewstep.engine.lora import merge_adapters

    teacher = load_model(wan22_dir)
    ema = tensors(lora_runs["single"], 2, "ema/student")
    assert ema and all(".lora_" in k and k.startswith("backbone.model.") for k in ema)
    want = merge_adapters(teacher.denoisers()["transformer"].state_dict(), ema, scale=2.0)
    student = load_model(lora_runs["single"] / "student")
    for slot in ("transformer", "transformer_2"):
        got = student.component(slot).state_dict()
        for k, v in got.items():
            torch.testing.assert_close(v, want[f"backbone.model.{k}"], rtol=0, atol=1e-6)


def test_lora_only_export_of_a_single_student_is_its_experts(wan22_dir, lora_runs, tmp_path, capsys):
    """A single LoRA student's adapters belong to the high-noise expert only: one file, which in the teacher's
    transformer equals RUN/student (either slot); the note says to route every step there."""
    from diffusers import WanPipeline

    out = tmp_path / "lora"
    rc, _, err = cli(capsys, "export", lora_runs["single"], "--out", out, "--lora-only")
    assert rc == 0, err
    record = json.loads((out / "export.json").read_text())["lora"]
    assert list(record["experts"]) == ["transformer"] and "boundary_ratio None" in record["note"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    pipe = WanPipeline.from_pretrained(wan22_dir, local_files_only=True)
    pipe.load_lora_weights(out)
    student = load_model(lora_runs["single"] / "student")
    torch.testing.assert_close(forward(pipe.transformer), forward(student.component("transformer_2")), rtol=1e-4,
                               atol=1e-5)


def test_accvideo_with_teacher_feature_heads_runs_on_wan22(wan22_dir, tmp_path, capsys):
    """AccVideo's discriminator heads read the routed teacher's block features (each sample's expert); data
    latents forward-diffused (no trajectory store)."""
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *run_args(wan22_dir, run, "per_expert", "train.steps=2", "train.checkpoint_every=0",
                                       "preset=[forward]", "generator.times=accvideo_uniform", recipe="accvideo"))
    assert rc == 0, err
    assert sorted(losses(run)) == [1, 2]
    assert any(k.startswith("loss/discriminator") for k in losses(run)[2])
    assert all(torch.isfinite(torch.tensor(v)).all() for rec in losses(run).values() for v in rec.values())


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["wan22", "wan21"])
def test_fsdp_on_two_processes_matches_one(teacher, wan22_dir, wan_dir, tmp_path):
    """FSDP2 shards both experts' blocks of the per-expert student, the fake score and the teacher over 2 processes
    (gloo; one sample per micro-batch, so every call has an idle expert, run in the same order on every rank): the
    losses and weights of one process. wan21: a full (not LoRA) student of a one-transformer Wan, whose frozen EMA
    target (CD's θ⁻) is an FSDP root that must reshard after its forward."""
    from fewstep.cli import main
    from helpers import cli_subprocess

    model = wan22_dir if teacher == "wan22" else wan_dir

    extra = ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "roles.student.every=1"]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert main(run_args(model, single, "per_expert", *extra)) == 0
    proc = cli_subprocess(*run_args(model, sharded, "per_expert", *extra, "train.distributed=fsdp",
                                    "train.grad_accum=2"),
                          launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(sharded)) == [1, 2]
    for a in assert_runs_match(single, sharded, 2).values():
        assert teacher == "wan21" or any(".transformer_2." in k for k in a)
