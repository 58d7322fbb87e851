"""Distillation on a real (diffusers) teacher by config alone: DOLLAR and AccVideo on tiny random
WanPipeline (flow) and CogVideoXPipeline (VP, v-prediction) teachers built here, with and without
LoRA roles, stopped and resumed bit for bit; a LoRA role trains adapters only, shares the teacher's
base weights, checkpoints adapters only, and RUN/student is the base with the adapters merged."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.engine.lora import LoraConfig, add_lora, merge_adapters, shared_copy
from fewstep.models.backbones import Conditioning
from fewstep.models.family import load_model
from helpers import assert_runs_match, assert_same_checkpoint, cli, losses, make_tiny_cogvideox_pipeline, tensors

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
LORA = ["roles.student.lora.rank=4", "roles.student.lora.alpha=8", "roles.fake_score.lora.rank=4"]


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory):
    return make_tiny_cogvideox_pipeline(tmp_path_factory.mktemp("cog") / "cog")


@pytest.fixture(scope="module")
def models(wan_dir, cog_dir):
    return {"wan": wan_dir, "cog": cog_dir}


@pytest.fixture(scope="module")
def stores(models, tmp_path_factory):
    """A 4-trajectory store of each teacher (fewstep synth) for AccVideo."""
    from fewstep.cli import main

    where = tmp_path_factory.mktemp("store")
    (where / "prompts.txt").write_text("a cat runs in the park\na red circle moves left\n")
    for name, model in models.items():
        assert main(["synth", "--teacher", str(model), "--prompts", str(where / "prompts.txt"), "--out",
                     str(where / name), "--num", "4", "--steps", "10", "--batch-size", "4"]) == 0
    return {name: where / name for name in models}


def run_args(recipe, model, out, *extra):
    sets = [f"model={model}", f"train.steps={STEPS}", "train.batch_size=2", "train.eval_every=0",
            "train.checkpoint_every=5", "train.log_every=1", "train.tensorboard=false", *extra]
    return ["distill", "--recipe", recipe, "--out", out, *[a for s in sets for a in ("--set", s)]]


#: name → (teacher, recipe, overrides): Wan (flow) and CogVideoX (VP, v-prediction), full and LoRA roles
CASES = {
    "dollar": ("wan", "dollar", []),
    "dollar-lora": ("wan", "dollar", LORA),
    "accvideo-lora": ("wan", "accvideo", ["roles.student.lora.rank=4", "roles.student.lora.alpha=8"]),
    "cog-dollar-lora": ("cog", "dollar", LORA),
    "cog-accvideo": ("cog", "accvideo", []),
}


def case_args(name, models, stores, out, *more):
    teacher, recipe, extra = CASES[name]
    data = [f"data={stores[teacher]}"] if recipe == "accvideo" else []
    return run_args(recipe, models[teacher], out, *extra, *data, *more)


@pytest.fixture(scope="module")
def reference_runs(models, stores, tmp_path_factory):
    """The uninterrupted 10-step runs (on one thread, as the tests: a thread count changes float sums)."""
    from fewstep.cli import main

    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in CASES:
            runs[name] = tmp_path_factory.mktemp("ref") / name
            assert main(case_args(name, models, stores, runs[name])) == 0
    finally:
        torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_resume_on_a_real_teacher_is_exact(name, reference_runs, models, stores, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *case_args(name, models, stores, run, "train.steps=5"))
    assert rc == 0, err
    rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}")
    assert rc == 0, err
    assert_same_checkpoint(run, reference_runs[name], STEPS, must=("roles/student", "optim/student"))
    losses_seen = losses(run)
    assert sorted(losses_seen) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)).all() for rec in losses_seen.values() for v in rec.values())


def test_a_lora_run_checkpoints_adapters_and_exports_them_merged(reference_runs, wan_dir):
    run = reference_runs["dollar-lora"]
    for stem in ("roles/student", "ema/student", "roles/fake_score"):
        keys = tensors(run, STEPS, stem).keys()
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), stem
    assert all(".lora_" in k.split("::")[0] for k in tensors(run, STEPS, "optim/student"))
    ema = tensors(run, STEPS, "ema/student")
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in ema.items())  # it trained
    # the teacher's directory is untouched; RUN/student is base + (α/r)·B A of the EMA adapters
    teacher, student = load_model(wan_dir), load_model(run / "student")
    base = teacher.denoiser.state_dict()
    want = merge_adapters(base, ema, scale=8 / 4)
    got = student.denoiser.state_dict()
    assert got.keys() == base.keys()
    changed = [k for k in base if not torch.equal(got[k], base[k])]
    assert changed and all(".attn" in k or ".ffn" in k for k in changed)
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert json.loads((run / "student" / "fewstep_model.json").read_text())["sampling"]["sampler"] == "consistency"


def test_a_full_student_run_on_wan_changes_the_transformer(reference_runs, wan_dir):
    run = reference_runs["dollar"]
    keys = tensors(run, STEPS, "roles/student").keys()
    assert not any(".lora_" in k for k in keys) and any(k.startswith("backbone.model.blocks.0") for k in keys)
    student = load_model(run / "student")
    assert student.default_steps() == 4 and student.sampling.cfg_scale is None


# ---------------------------------------------------------------------------------------------
# engine/lora.py on its own
# ---------------------------------------------------------------------------------------------

def test_shared_copy_shares_every_tensor_and_lora_starts_at_the_base(wan_dir):
    model = load_model(wan_dir)
    base = model.denoiser
    copy = shared_copy(base)
    assert copy is not base and copy.backbone is not base.backbone
    assert all(a is b for a, b in zip(copy.parameters(), base.parameters()))
    torch.manual_seed(0)
    add_lora(copy, LoraConfig(rank=2, alpha=4))
    trainable = [n for n, p in copy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in base.parameters())  # the shared base stays frozen
    x = torch.randn(model.latent_shape(2))
    cond = Conditioning(torch.randn(2, 16, 16), torch.ones(2, 16, dtype=torch.bool))
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(copy(x, t, cond), base(x, t, cond), rtol=0, atol=0)  # B = 0


def test_merged_weights_equal_the_lora_forward(wan_dir):
    """merge_adapters(W, A, B) = W + (α/r)·B A: the merged plain model computes what peft's LoRA layers do."""
    model = load_model(wan_dir)
    base = model.denoiser
    lora = shared_copy(base)
    torch.manual_seed(0)
    add_lora(lora, LoraConfig(rank=2, alpha=6, targets=["to_q", "to_v", "ffn.net.0.proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if ".lora_" in n}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} >= {"to_q", "to_v"}
    merged = load_model(wan_dir).denoiser
    merged.load_state_dict(merge_adapters(base.state_dict(), adapters, scale=3.0))
    x = torch.randn(model.latent_shape(1))
    cond = Conditioning(torch.randn(1, 16, 16), torch.ones(1, 16, dtype=torch.bool))
    t = torch.tensor([0.5], dtype=torch.float64)
    with torch.no_grad():
        out_lora, out_merged, out_base = lora(x, t, cond), merged(x, t, cond), base(x, t, cond)
    torch.testing.assert_close(out_merged, out_lora, rtol=1e-5, atol=1e-5)
    assert (out_lora - out_base).abs().max() > 1e-3  # the adapters do something


def test_lora_on_a_frozen_role_is_a_config_error(wan_dir, tmp_path, capsys):
    rc, _, err = cli(capsys, *run_args("dollar", wan_dir, tmp_path / "run", "roles.teacher.lora.rank=4"))
    assert rc == 2 and err.count("\n") == 1 and "lora needs optim" in err, err
    assert not (tmp_path / "run").exists()


def test_frozen_weights_in_bf16_are_one_shared_copy(wan_dir, tmp_path, capsys):
    """train.frozen_dtype=bfloat16: the teacher, and the base the LoRA student and fake score share with it,
    are one bf16 copy; adapters (and their optimiser) are float32; a short run stays finite."""
    from fewstep.engine.distributed import DistEnv
    from fewstep.engine.roles import build_roles
    from fewstep.recipes.base import recipe_class

    overrides = [f"model={wan_dir}", "train.frozen_dtype=bfloat16", *LORA]
    cls = recipe_class("dollar")
    recipe = cls(cls.load_config(overrides=overrides))
    roles = build_roles(recipe.build_modules(), recipe.config.roles, DistEnv(), False)
    teacher = dict(roles["teacher"].module.named_parameters())
    assert {p.dtype for p in teacher.values()} == {torch.bfloat16}
    for name in ("student", "fake_score"):
        params = dict(roles[name].module.named_parameters())
        adapters = [p for n, p in params.items() if ".lora_" in n]
        assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
        base = {n.replace(".base_layer", ""): p for n, p in params.items() if ".lora_" not in n}
        assert base.keys() == teacher.keys()
        assert all(base[n] is teacher[n] for n in teacher)  # the same tensors: no second copy
    assert roles["student"].ema.module is not roles["student"].module
    ema = dict(roles["student"].ema.module.named_parameters())
    assert all(ema[n] is p for n, p in params.items() if ".lora_" not in n)  # the EMA copies adapters only
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *run_args("dollar", wan_dir, run, "train.frozen_dtype=bfloat16", *LORA, "train.steps=5"))
    assert rc == 0, err
    assert all(torch.isfinite(torch.tensor(v)).all() for rec in losses(run).values() for v in rec.values())
    student = load_model(run / "student")  # the adapters merged into the bf16 base
    assert torch.isfinite(student.sample_latents(["a cat runs in the park"], seed=0).x).all()


def test_training_from_a_cache_never_loads_the_vae_or_text_encoder(wan_dir, tmp_path, capsys, monkeypatch):
    """With data: {kind: latent_cache} the encoders stay on disk; RUN/student is still a complete pipeline."""
    from diffusers import WanPipeline

    from fewstep.models.diffusers_family import DiffusersVideoModel

    (tmp_path / "p.txt").write_text("a cat runs in the park\na dog runs\n")
    rc, _, err = cli(capsys, "cache", "--model", wan_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "c")
    assert rc == 0, err
    loaded = []
    real = DiffusersVideoModel.component

    def component(self, name):
        if name in self.lazy and name != "transformer":
            import traceback
            loaded.append((name, "".join(traceback.format_stack(limit=8))))
        return real(self, name)

    monkeypatch.setattr(DiffusersVideoModel, "component", component)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *run_args("dollar", wan_dir, run, "data={kind: latent_cache, path: " + str(tmp_path / "c") + "}",
                                       *LORA, "train.steps=3"))
    assert rc == 0, err
    assert loaded == [], loaded[0][1]
    pipe = WanPipeline.from_pretrained(run / "student", local_files_only=True)
    assert pipe.vae is not None and pipe.text_encoder is not None


def test_fsdp_lora_run_on_two_processes_matches_one_and_exports_alike(wan_dir, tmp_path):
    """FSDP2 shards the tiny Wan's LoRA student, LoRA fake score and frozen teacher over 2 processes (gloo):
    the same losses and adapters as one process, and its checkpoint exports the same pipeline."""
    from diffusers import WanPipeline

    from fewstep.cli import main
    from helpers import cli_subprocess

    extra = ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "roles.student.every=1", *LORA]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert main(run_args("dollar", wan_dir, single, *extra)) == 0
    proc = cli_subprocess(*run_args("dollar", wan_dir, sharded, *extra, "train.distributed=fsdp", "train.grad_accum=2"),
                          launcher=("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(sharded)) == [1, 2]
    for a in assert_runs_match(single, sharded, 2).values():
        assert all(".lora_" in k for k in a)
    for run in (single, sharded):
        assert main(["export", str(run), "--out", str(run / "export")]) == 0
    a = WanPipeline.from_pretrained(single / "export", local_files_only=True).transformer.state_dict()
    b = WanPipeline.from_pretrained(sharded / "export", local_files_only=True).transformer.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe,presets", [("finetune", []), ("dollar", ["lrm"]), ("dollar", ["vsd", "ddpo"]),
                                            ("accvideo_lrm", [])])
def test_every_recipe_runs_on_a_real_teacher_by_config(recipe, presets, models, stores, tmp_path, capsys):
    """The recipes and presets not covered above, 2 steps each on the tiny Wan (pixel rewards decode through
    its VAE; AccVideo's heads read its transformer's blocks)."""
    data = [f"data={stores['wan']}"] if recipe.startswith("accvideo") else []
    argv = run_args(recipe, models["wan"], tmp_path / "run", *data, "train.steps=2", "train.checkpoint_every=0")
    rc, _, err = cli(capsys, *argv, *[a for p in presets for a in ("--preset", p)])
    assert rc == 0, err
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "student" / "model_index.json").is_file()


def test_default_lora_targets_are_the_linear_layers_of_the_repeated_blocks(tiny_pipeline, wan_dir):
    """targets: null adapts the Linear layers inside a ModuleList of blocks, not an embedder's Sequential."""
    from fewstep.engine.lora import block_linears

    toy = block_linears(tiny_pipeline.denoiser)
    assert toy and all(".blocks." in name for name in toy), toy
    wan = block_linears(load_model(wan_dir).denoiser)
    assert wan and all(name.startswith("backbone.model.blocks.") for name in wan), wan
    assert any(name.endswith("attn1.to_q") for name in wan) and any("ffn" in name for name in wan)
