"""One base for several LoRA roles (engine/lora.AdapterHub): what FSDP2 shards once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.engine.lora import (ADAPTER, AdapterEMA, AdapterHub, LoraConfig, add_lora, adapter_state, rename_adapter,
                                 rename_optimizer_adapter, shared_copy)
from fewstep.engine.roles import RoleSpec, build_roles, enable_gradient_checkpointing, shared_bases
from fewstep.models.backbones import Conditioning

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = LoraConfig(rank=2, alpha=4.0)


def inputs(denoiser, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 16, 8, 8)
    x = torch.randn(shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.8 + 0.1
    return x, t


def condition(pipeline, batch=2):
    return pipeline.encode_prompts(["a red circle moves left"] * batch)


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def hub_and_copies(pipeline):
    """A hub with adapters student and fake_score, and the per-role copies add_lora makes from the same RNG."""
    base = pipeline.denoiser.requires_grad_(False)
    torch.manual_seed(3)
    hub = AdapterHub(shared_copy(base))
    hub.add("student", LORA)
    hub.add("fake_score", LORA)
    torch.manual_seed(3)
    student = add_lora(shared_copy(base), LORA)
    fake = add_lora(shared_copy(base), LORA)
    return base, hub, student, fake


def test_each_view_computes_as_its_own_lora_copy(tiny_pipeline):
    """The teacher view is the base; a role's view equals a copy of its own with the same adapters, whatever the
    other adapters hold."""
    base, hub, student, fake = hub_and_copies(tiny_pipeline)
    # make B non-zero so the adapters change the output; the same values in the hub and the copies
    for name, copy in (("student", student), ("fake_score", fake)):
        perturb([p for _, p in hub.named_parameters(name)], seed=len(name))
        own = dict(copy.named_parameters())
        with torch.no_grad():
            for n, p in hub.named_parameters(name):
                own[n.replace(f".{name}.", f".{ADAPTER}.")].copy_(p)
    x, t = inputs(base)
    cond = condition(tiny_pipeline)
    with torch.no_grad():
        want_teacher, want_student, want_fake = base(x, t, cond), student(x, t, cond), fake(x, t, cond)
        teacher_view, student_view, fake_view = hub.view(None), hub.view("student"), hub.view("fake_score")
        assert student_view.backbone is fake_view.backbone is teacher_view.backbone  # one module
        torch.testing.assert_close(teacher_view(x, t, cond), want_teacher)
        torch.testing.assert_close(student_view(x, t, cond), want_student)
        torch.testing.assert_close(fake_view.predict(x, t, cond).x0, fake.predict(x, t, cond).x0)
        assert not torch.allclose(want_student, want_teacher) and not torch.allclose(want_student, want_fake)
    # the switch is undone after each call: the base alone again
    assert hub.state == (None, False)


def test_checkpointed_blocks_recompute_with_the_adapter_of_their_forward(tiny_pipeline):
    """Gradient checkpointing on: the student's loss, back-propagated after the fake score ran (switching the hub),
    gets the gradients it gets without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        base, hub, _, _ = hub_and_copies(tiny_pipeline)
        for name in ("student", "fake_score"):
            perturb([p for _, p in hub.named_parameters(name)], seed=len(name))
        student, fake = hub.view("student").train(), hub.view("fake_score").eval()
        if checkpointing:
            assert enable_gradient_checkpointing(hub.base) > 0
        x, t = inputs(base)
        cond = condition(tiny_pipeline)
        out = student(x, t, cond)
        with torch.no_grad():
            other = fake(x, t, cond)  # the hub runs fake_score's adapter in between
        (out * other).sum().backward()
        grads.append([p.grad.clone() for _, p in hub.named_parameters("student")])
        assert all(p.grad is None for _, p in hub.named_parameters("fake_score"))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


def test_adapter_ema_starts_at_the_live_adapter_and_lerps(tiny_pipeline):
    _, hub, _, _ = hub_and_copies(tiny_pipeline)
    rng = torch.get_rng_state()
    ema = AdapterEMA(hub, "student", 0.9)
    assert torch.equal(torch.get_rng_state(), rng)  # the EMA adapter draws nothing
    live = dict(hub.named_parameters("student"))
    start = {n: p.detach().clone() for n, p in hub.named_parameters("student_ema")}
    for n, p in start.items():
        torch.testing.assert_close(p, live[n.replace(".student_ema.", ".student.")])
    assert not any(p.requires_grad for _, p in hub.named_parameters("student_ema"))
    perturb(live.values(), seed=5)
    ema.update(hub.view("student"))
    for n, p in hub.named_parameters("student_ema"):
        want = 0.9 * start[n] + 0.1 * live[n.replace(".student_ema.", ".student.")]
        torch.testing.assert_close(p, want)


def test_adapter_names_convert_for_checkpoints():
    state = {"b.0.q.lora_A.fake_score.weight": 1, "b.0.q.lora_B.fake_score.weight": 2, "b.0.q.base_layer.weight": 3}
    assert rename_adapter(state, "fake_score", ADAPTER) == {
        "b.0.q.lora_A.default.weight": 1, "b.0.q.lora_B.default.weight": 2, "b.0.q.base_layer.weight": 3}
    assert adapter_state(state, "student") == {}
    optim = {"state": {"b.0.q.lora_A.student.weight": {"step": 1}},
             "param_groups": [{"lr": 1.0, "params": ["b.0.q.lora_A.student.weight"]}]}
    back = rename_optimizer_adapter(rename_optimizer_adapter(optim, "student", ADAPTER), ADAPTER, "student")
    assert back == optim


def test_under_fsdp_the_lora_roles_and_the_teacher_share_one_base(tiny_pipeline):
    """shared_bases (what build_roles does under FSDP2, here without sharding): one module for the teacher, a LoRA
    student (and its EMA) and a LoRA fake score; the optimisers step their own adapters; a full-trainable role
    keeps its own copy."""
    base = tiny_pipeline.denoiser.requires_grad_(False)
    modules = {"student": shared_copy(base), "teacher": shared_copy(base), "fake_score": shared_copy(base),
               "full": shared_copy(base)}
    modules["full"] = __import__("copy").deepcopy(base).requires_grad_(True)
    optim = {"lr": 1e-3}
    specs = {"student": RoleSpec(optim=optim, lora=LORA.model_dump(), ema=0.9),
             "teacher": RoleSpec(), "fake_score": RoleSpec(optim=optim, lora=LORA.model_dump()),
             "full": RoleSpec(optim=optim)}
    env = SimpleNamespace(distributed=True, mode="fsdp", device=torch.device("cpu"))
    views = shared_bases(modules, specs, env)
    assert set(views) == {"student", "teacher", "fake_score"}
    hub = views["student"].hub
    assert views["teacher"].hub is hub and views["fake_score"].hub is hub
    assert views["teacher"].adapter is None
    # the hub owns its tensors (a copy of the base: sharding it frees them), and holds the base once
    base_ids = {id(p) for p in base.parameters()}
    assert not any(id(p) in base_ids for p in hub.base.parameters())
    n_base = sum(p.numel() for p in base.parameters())
    n_adapters = sum(p.numel() for n, p in hub.base.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for p in hub.base.parameters()) == n_base + n_adapters
    # the roles built on them (one process: no wrapping)
    env1 = SimpleNamespace(distributed=False, mode="fsdp", device=torch.device("cpu"))
    roles = build_roles({**modules, **views}, specs, env1, gradient_checkpointing=False)
    assert {id(p) for p in roles["student"].params} == {id(p) for _, p in hub.named_parameters("student")}
    assert {id(p) for p in roles["fake_score"].params} == {id(p) for _, p in hub.named_parameters("fake_score")}
    assert roles["student"].ema.module.adapter == "student_ema"
    weights = roles["fake_score"].weights()
    assert weights and all(f".lora_{ab}.{ADAPTER}." in k for k in weights for ab in "AB" if f"lora_{ab}" in k)
    assert set(weights) == {n.replace(".fake_score.", f".{ADAPTER}.") for n, _ in hub.named_parameters("fake_score")}
