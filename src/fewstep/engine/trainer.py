"""The training loop. It knows roles, objectives, stages and cadence — never a method (DESIGN §1).

One engine step, for the stage the step falls in:

1. **data** — read this process's share of the global batch at the current data position (prepared
   during the previous step by the :class:`~fewstep.engine.data.Prefetcher` when
   ``train.prefetch`` is on);
2. **role updates** — for each role the stage's objectives update, in order of first appearance,
   if its cadence fires (``(stage_step + 1) % every == 0``):
   zero_grad → for each micro-batch: call the role's objectives under optional bf16 autocast,
   ``Σ weight · loss.mean() / grad_accum`` → backward (gradient sync only on the last
   micro-batch) → global grad norm + clipping → if every loss and the norm are finite:
   LR warm-up, ``optimizer.step()``, EMA update; else skip the update and count a bad step;
3. **bookkeeping** — advance the data position, log, evaluate (``train.eval_every``),
   checkpoint (``train.checkpoint_every``, and at the end). ``RUN/student`` is exported with the
   student's (EMA) weights at the start and with every checkpoint.

Objectives run one role at a time, so a role updated later in a step sees the roles updated
before it (alternating optimisation, as in GANs and DMD's fake-score/generator loop).

The recipe is reached only through the :class:`Plan` protocol below, so the engine imports no
recipe, data source, evaluator or model family: the plan hands them over. Stopping conditions
(``train.max_bad_steps`` non-finite steps in a row, a health issue under
``train.stop_on_collapse``) save a checkpoint, then raise :class:`TrainingStopped`, a one-line
:class:`~fewstep.errors.UserError`.

**Signals.** While :meth:`Trainer.run` runs (in the main thread), SIGINT (Ctrl-C) and SIGTERM
(what a cluster scheduler sends before preemption; torchrun forwards it to every worker) only
set a flag. Before each step the processes agree (an all-reduce) whether any of them got one;
if so the run stops there — the step in progress when the signal came is finished — writes a
checkpoint, prints where it is, what ``RUN/student`` holds and the ``--resume`` command, and
raises :class:`TrainingInterrupted` (exit code 130 for SIGINT, 143 for SIGTERM: 128 + signal
number). Further signals are ignored until the checkpoint is written (writing is atomic
anyway); the previous handlers are restored when :meth:`~Trainer.run` returns. A signal during
the last step changes nothing: the run ends as usual.

``RUN/run.json`` records which step ``RUN/student`` holds (``"student": {"step": N, "of":
train.steps}``, :func:`~fewstep.engine.rundir.record_student`), and the end of a run (or its
interruption) prints the student's path, that step and the commands to evaluate it.

Test hook (only for the signal tests): ``FEWSTEP_TEST_SIGNAL=<step>:<SIGNAL>[:<rank>]`` (e.g.
``3:SIGTERM``) makes the process (only rank ``<rank>`` if given) send itself ``SIGNAL`` just
before engine step ``<step>`` (1-based) runs, so the run must finish that step and stop with
``<step>`` steps done — like a Ctrl-C or a scheduler's SIGTERM arriving mid-step.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..objectives.base import Objective, StepContext, build_objective
from ..objectives.student import StudentGenerator
from . import checkpoint as ckpt
from .config import EngineConfig
from .data import DataSource, Prefetcher, spare_cores
from .distributed import DistEnv, clip_grad_norm, init_distributed, set_gradient_sync
from .evaluation import Evaluator, run_evaluation
from .health import HealthIssue, HealthMonitor
from .logging import NullLogger, RunLogger
from .roles import Role, Roles, build_roles
from .rundir import describe_student, init_run_dir, record_student, student_record

SIGNAL_ENV = "FEWSTEP_TEST_SIGNAL"
#: the signals that stop a run after its current step, with a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Plan(Protocol):
    """What the engine needs from a recipe (:class:`fewstep.recipes.base.Recipe` implements it)."""

    name: str
    config: EngineConfig

    def build_modules(self) -> dict[str, nn.Module]: ...  # one module per declared role
    def prepare_objective(self, objective: Objective, device: torch.device) -> None: ...  # after it is built
    def data_source(self, device: torch.device) -> DataSource: ...
    def evaluator(self, monitor: HealthMonitor) -> Evaluator: ...  # periodic evaluation of the student
    def student_pipeline(self): ...  # a plain model (VideoModel) to load student weights into, or None
    def load_student(self, pipe, weights: dict[str, torch.Tensor]) -> None: ...  # the student role's weights
    def student_generator(self) -> StudentGenerator: ...  # the one G_θ(ε) every objective samples
    def example_prompt(self) -> str: ...  # shown in the commands printed at the end of a run
    def example_image(self) -> str | None: ...  # its --image (an image-to-video model), or None
    def start_stage(self, index: int, roles: Roles) -> None: ...


class TrainingStopped(UserError):
    """The run stopped itself (non-finite losses, a health check); its last state is checkpointed."""


class TrainingInterrupted(UserError):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after the step it was in; that step is
    checkpointed and the message names the ``--resume`` command. ``exit_code`` is 128 + the
    signal number: 130 for SIGINT, 143 for SIGTERM."""

    exit_code = 128 + signal.SIGINT

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag (:attr:`received`) for the training loop to read.

    :meth:`install` does nothing outside the main thread (Python delivers signals there only)
    and leaves a signal that is ignored (``SIG_IGN``) ignored; :meth:`restore` puts the previous
    handlers back. The handler only sets the flag (the first signal's number) and writes one
    notice on stderr (``os.write``: safe inside a signal handler); later signals change nothing.
    """

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # ignored on purpose (e.g. a background job's SIGINT)
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            text = (f"\n{name} received: finishing the current step, then saving a checkpoint "
                    f"(further signals are ignored until it is written)\n")
        else:
            text = f"\n{name} received: already stopping; the checkpoint is being written\n"
        if self.announce:
            try:
                os.write(2, text.encode())
            except OSError:
                pass


def _test_signal_hook(step: int, rank: int) -> None:
    """``FEWSTEP_TEST_SIGNAL=<step>:<SIGNAL>[:<rank>]``: send ourselves SIGNAL before ``step`` runs."""
    spec = os.environ.get(SIGNAL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        os.kill(os.getpid(), getattr(signal, parts[1]))


@dataclass
class TrainState:
    step: int = 0  # engine steps completed
    stage: int = 0  # index into the config's stage bounds
    data_position: int = 0  # samples consumed from the data stream
    bad_streak: int = 0  # consecutive steps with a skipped (non-finite) update
    saved_step: int = -1  # step of the last checkpoint written


@dataclass
class Stage:
    name: str
    start: int
    end: int
    objectives: list[Objective]
    order: list[str]  # roles updated in this stage, in order of first appearance
    every: dict[str, int]


@dataclass
class RoleUpdate:
    losses: dict[str, float]  # "<objective>/<term>" → mean over the global batch
    total: float
    metrics: dict[str, float]
    grad_norm: float
    lr: float
    applied: bool


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns the run's roles, stages, data and state; :meth:`run` is the loop."""

    def __init__(self, plan: Plan, run_dir: Path, env: DistEnv):
        cfg = plan.config
        self.plan, self.cfg, self.env, self.run_dir = plan, cfg, env, Path(run_dir)
        seed_everything(cfg.train.seed)
        self.roles = build_roles(plan.build_modules(), cfg.roles, env, cfg.train.gradient_checkpointing)
        self.stages = []
        for name, start, end in cfg.stage_bounds():
            stage_cfg = cfg.stages[name]
            objectives = [build_objective(oname, ocfg) for oname, ocfg in stage_cfg.objectives.items()]
            for obj in objectives:
                plan.prepare_objective(obj, env.device)
            order = list(dict.fromkeys(o.role for o in objectives))
            every = {r: stage_cfg.every.get(r, cfg.roles[r].every) for r in order}
            self.stages.append(Stage(name, start, end, objectives, order, every))
        self.source = plan.data_source(env.device)
        self._prefetcher: Prefetcher | None = None  # started by the first step that reads the source
        self.flush_denormal = False  # set by train(): the data thread flushes denormals as the main thread does
        self.student = plan.student_generator()  # the one G_θ(ε) every objective samples (ctx.student)
        self.monitor = HealthMonitor(cfg.train.health)
        self.state = TrainState()
        self.logger: RunLogger | NullLogger = NullLogger()
        per_step = cfg.train.batch_size
        if per_step % (env.world_size * cfg.train.grad_accum):
            raise UserError(f"config key 'train.batch_size': {per_step} is not divisible by "
                            f"{env.world_size} processes × train.grad_accum={cfg.train.grad_accum}")
        self._reported: set[tuple[str, str]] = set()  # health issues already printed
        self._health: dict[str, list[HealthIssue]] = {}  # current issues: "losses", "samples"
        self._student_step: int | None = None  # step RUN/student holds, once this process exported it (rank 0)

    # ---------------------------------------------------------------------------------- one step
    def update_role(self, role: Role, objectives: list[Objective], batch, ctx: StepContext) -> RoleUpdate:
        """Accumulate the role's objectives over micro-batches, then (if finite) step it."""
        train, env = self.cfg.train, self.env
        accum = train.grad_accum
        micro = len(batch) // accum
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        role.optimizer.zero_grad(set_to_none=True)
        for m in range(accum):
            mb = batch.slice(m * micro, (m + 1) * micro)
            mctx = ctx.with_batch(mb.sample_ids, m)
            set_gradient_sync(role.dp_root, m == accum - 1)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=train.bf16):
                total = 0.0
                for obj in objectives:
                    out = obj(mb, self.roles, mctx)
                    assert out.role == role.name, f"objective {obj.name} returned losses for {out.role}"
                    for term, loss in out.losses.items():
                        assert loss.shape == (len(mb),), f"{obj.name}/{term}: expected per-sample loss ({len(mb)},), got {tuple(loss.shape)}"
                        mean = loss.float().mean()
                        total = total + obj.weight * mean
                        key = f"{obj.name}/{term}"
                        sums[key] = sums.get(key, 0.0) + mean.detach() / accum
                    for k, v in out.metrics.items():
                        metrics[f"{obj.name}/{k}"] = metrics.get(f"{obj.name}/{k}", 0.0) + float(v) / accum
            (total / accum).backward()
        set_gradient_sync(role.dp_root, True)
        grad_norm = clip_grad_norm(role.params, role.spec.optim.grad_clip)
        keys = sorted(sums)
        values = env.all_reduce_mean(torch.stack([sums[k] for k in keys]).float()).tolist()
        losses = dict(zip(keys, values))
        weights = {f"{o.name}/": o.weight for o in objectives}
        weighted = sum(weights[k[:k.index("/") + 1]] * v for k, v in losses.items())
        applied = math.isfinite(weighted) and math.isfinite(grad_norm)
        lr = 0.0
        if applied:
            lr = role.set_lr()
            role.optimizer.step()
            role.updates += 1
            if role.ema is not None:
                role.ema.update(role.module)
        role.optimizer.zero_grad(set_to_none=True)
        return RoleUpdate(losses, weighted, metrics, grad_norm, lr, applied)

    def positions(self, data_position: int) -> range:
        """This process's share of the global batch that starts at ``data_position``."""
        share = self.cfg.train.batch_size // self.env.world_size
        first = data_position + self.env.rank * share
        return range(first, first + share)

    def prefetching(self) -> bool:
        """``train.prefetch``, with ``auto`` resolved (engine/data.py)."""
        prefetch = self.cfg.train.prefetch
        if prefetch == "auto":
            return self.env.device.type != "cpu" or spare_cores() > 0
        return prefetch

    def next_batch(self):
        """The current step's batch. Prefetching, every batch comes from the data thread, which then
        prepares the next step's while this step trains; else the source runs here."""
        train, st = self.cfg.train, self.state
        positions = self.positions(st.data_position)
        if not self.prefetching():
            return self.source.batch(positions, self.env.device)
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(self.source, self.env.device, init=self._data_thread_init)
        ahead = self.positions(st.data_position + train.batch_size) if st.step + 1 < train.steps else None
        return self._prefetcher.batch(positions, ahead)

    def _data_thread_init(self) -> None:
        """Per-thread state the data thread must share with this one."""
        if self.flush_denormal:
            torch.set_flush_denormal(True)
        if self.env.device.type == "cuda":
            torch.cuda.set_device(self.env.device)

    def close(self) -> None:
        """Stop the data thread (waiting for a batch in flight)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def stage_index(self, step: int) -> int:
        return next(i for i, s in enumerate(self.stages) if s.start <= step < s.end)

    def train_step(self, batch=None) -> dict:
        """One engine step (``batch``: this process's share; read from the data source if None)."""
        train, env, st = self.cfg.train, self.env, self.state
        stage = self.stages[st.stage]
        stage_step = st.step - stage.start
        if batch is None:
            batch = self.next_batch()
        record, bad = {}, []
        for name in stage.order:
            if (stage_step + 1) % stage.every[name]:
                continue
            role = self.roles[name]
            ctx = StepContext(step=st.step, stage=st.stage, stage_step=stage_step, role=name, seed=train.seed,
                              device=env.device, sample_ids=batch.sample_ids, generator=torch.Generator(),
                              rank=env.rank, world_size=env.world_size, student=self.student)
            upd = self.update_role(role, [o for o in stage.objectives if o.role == name], batch, ctx)
            record[f"loss/{name}"] = upd.total
            record.update({f"loss/{name}/{k}": v for k, v in upd.losses.items()})
            record.update({f"metric/{name}/{k}": v for k, v in upd.metrics.items()})
            record[f"grad_norm/{name}"] = upd.grad_norm
            if upd.applied:
                record[f"lr/{name}"] = upd.lr
            else:
                bad.append(name)
        st.step += 1
        st.data_position += train.batch_size
        if bad:
            st.bad_streak += 1
            self.logger.message(f"step {st.step}: non-finite loss or gradient for {', '.join(bad)}; update skipped "
                                f"({st.bad_streak}/{train.max_bad_steps} in a row)")
            record["skipped"] = len(bad)
        else:
            st.bad_streak = 0
        self.monitor.observe({k: v for k, v in record.items() if k.startswith("loss/")})
        return record

    # ---------------------------------------------------------------------------------- the loop
    def run(self, resume_from: Path | None, config_yaml: str, *, overwrite: bool, resuming_here: bool) -> TrainState:
        signals = StopSignals(announce=self.env.is_main)
        signals.install()
        try:
            return self._run(signals, resume_from, config_yaml, overwrite=overwrite, resuming_here=resuming_here)
        finally:
            self.close()
            signals.restore()

    def _run(self, signals: StopSignals, resume_from: Path | None, config_yaml: str, *, overwrite: bool,
             resuming_here: bool) -> TrainState:
        train, env = self.cfg.train, self.env
        if resume_from is not None:
            self.restore(ckpt.read_checkpoint(resume_from))
            if not resuming_here:
                self.state.saved_step = -1  # this run directory has no checkpoint of that step yet
        else:
            self.plan.start_stage(0, self.roles)
        st = self.state
        # built before anything is written: an evaluator that refuses its inputs leaves no run directory
        evaluator = self.plan.evaluator(self.monitor) if train.eval_every and "student" in self.roles else None
        env.barrier()  # every process has passed its checks before rank 0 writes anything
        if env.is_main:
            init_run_dir(self.run_dir, self.plan.name, config_yaml, overwrite=overwrite, resuming_here=resuming_here)
            self.logger = RunLogger(self.run_dir, train.steps, st.step, tensorboard=train.tensorboard)
        env.barrier()
        if resume_from is None or not self.student_is_current():
            self.export_student()  # RUN/student is loadable from the start
        totals: dict[str, list[float]] = {}
        try:
            if st.step < train.steps:
                every = (f"a checkpoint (and RUN/student) every {train.checkpoint_every} steps and at the end"
                         if train.checkpoint_every else "a checkpoint (and RUN/student) at the end")
                self.logger.message(f"training {self.plan.name} in {self.run_dir}: steps {st.step + 1}-{train.steps}, "
                                    f"{every}; Ctrl-C stops after the current step with a checkpoint")
            self.logger.start_clock(st.step)
            while st.step < train.steps:
                if (signum := self.agreed_signal(signals)) is not None:
                    self.interrupt(signum)
                _test_signal_hook(st.step + 1, env.rank)
                index = self.stage_index(st.step)
                if index != st.stage:
                    st.stage = index
                    self.plan.start_stage(index, self.roles)
                    self.monitor.restart_losses()  # the stage's losses sum other objectives: a new trend
                t0 = time.perf_counter()
                record = self.train_step()
                record["time/step"] = time.perf_counter() - t0
                for k, v in record.items():
                    totals.setdefault(k, []).append(v)
                stopping = st.bad_streak >= train.max_bad_steps
                if st.step % train.log_every == 0 or st.step == train.steps or stopping:
                    self.log(totals)
                    totals = {}
                self.logger.tick(st.step)
                if stopping:
                    self.stop(f"training stopped at step {st.step}: {st.bad_streak} steps in a row had non-finite "
                              f"losses or gradients (train.max_bad_steps={train.max_bad_steps}); lower the learning "
                              f"rate or check the data, then --resume {self.run_dir}")
                if evaluator and (st.step % train.eval_every == 0 or st.step == train.steps):
                    self.evaluate(evaluator)
                if train.checkpoint_every and st.step % train.checkpoint_every == 0:
                    self.save()
            if st.saved_step != st.step:
                self.save()
            self.announce_end()
        finally:
            self.logger.close()
        return st

    # ---------------------------------------------------------------------------------- stopping on a signal
    def agreed_signal(self, signals: StopSignals) -> int | None:
        """The signal every process stops for (SIGTERM if any process got one, else SIGINT if any
        did), or None: collective under torchrun, so that all ranks stop at the same step."""
        got = signals.received
        if not self.env.distributed:
            return got
        flags = torch.tensor([float(got == signal.SIGINT), float(got == signal.SIGTERM)], device=self.env.device)
        sigint, sigterm = self.env.all_reduce_mean(flags).tolist()
        return signal.SIGTERM if sigterm > 0 else signal.SIGINT if sigint > 0 else None

    def resume_command(self) -> str:
        """The command that continues this run (under torchrun: with as many processes per node)."""
        run = shlex.quote(str(self.run_dir))
        if not self.env.distributed:
            return f"fewstep distill --resume {run}"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.env.world_size))
        if local == self.env.world_size:
            return f"torchrun --nproc_per_node={local} -m fewstep.cli distill --resume {run}"
        return f"torchrun <the same launch options> -m fewstep.cli distill --resume {run}"

    def interrupt(self, signum: int) -> None:
        """Checkpoint the current step, say where everything is, raise :class:`TrainingInterrupted`."""
        st, name = self.state, signal.Signals(signum).name
        self.logger.message(f"{name}: stopping after step {st.step} of {self.cfg.train.steps}; saving a checkpoint")
        if st.saved_step != st.step:
            self.save()
        self.announce_end(interrupted=True)
        where = ckpt.checkpoints_dir(self.run_dir) / f"step_{st.step:06d}"
        raise TrainingInterrupted(f"training interrupted by {name} after step {st.step} of {self.cfg.train.steps}; "
                                  f"checkpoint saved in {where}; continue with: {self.resume_command()}", signum)

    def announce_end(self, interrupted: bool = False) -> None:
        """Print (rank 0) the last checkpoint, what ``RUN/student`` holds, how to evaluate it and,
        after an interruption, how to continue."""
        st, steps, run = self.state, self.cfg.train.steps, self.run_dir
        where = ckpt.checkpoints_dir(run) / f"step_{st.step:06d}"
        lines = [f"{'interrupted' if interrupted else 'done'}: step {st.step} of {steps}; checkpoint {where}"]
        if self._student_step is not None:
            student, prompt, image = run / "student", self.plan.example_prompt(), self.plan.example_image()
            q = shlex.quote
            lines += [f"student: {student} holds {describe_student({'step': self._student_step, 'of': steps})}",
                      f"  evaluate it: fewstep eval --model {q(str(student))} --out "
                      f"{q(str(run / f'eval_step{self._student_step}'))}",
                      f"  sample it:   fewstep generate --model {q(str(student))} --prompt {q(prompt)} "
                      + (f"--image {q(image)} " if image else "")
                      + f"--out {q(str(run / f'samples_step{self._student_step}'))}"]
        if interrupted:
            lines.append(f"continue training with: {self.resume_command()}")
        for line in lines:
            self.logger.message(line)

    def log(self, totals: dict[str, list[float]]) -> None:
        st = self.state
        record = {"stage": self.stages[st.stage].name,
                  **{k: float(np.mean(v)) for k, v in totals.items() if k != "skipped"}}
        if "skipped" in totals:
            record["skipped"] = int(sum(totals["skipped"]))
        self.logger.log(st.step, record)
        issues = self.monitor.check_losses()
        self._health["losses"] = issues
        kinds = sorted({i.kind for found in self._health.values() for i in found})
        self.logger.progress(st.step, {**record, **({"health": ", ".join(kinds)} if kinds else {})})
        self.report(issues)

    def report(self, issues: list[HealthIssue]) -> None:
        """Print and log new health issues (once each); stop under ``train.stop_on_collapse``."""
        new = [i for i in issues if (i.kind, i.subject) not in self._reported]
        for issue in new:
            self._reported.add((issue.kind, issue.subject))
            self.logger.message(f"step {self.state.step}: {issue}")
        if new:
            self.logger.log(self.state.step, {"stage": self.stages[self.state.stage].name,
                                              "health": [str(i) for i in new]})
        if issues and self.cfg.train.stop_on_collapse:
            self.stop(f"training stopped at step {self.state.step} because train.stop_on_collapse is set: {issues[0]}")

    def stop(self, message: str) -> None:
        self.save()
        raise TrainingStopped(message)

    # ---------------------------------------------------------------------------------- evaluation
    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's (EMA if configured) full weights on rank 0 — collective under FSDP."""
        role = self.roles["student"]
        return role.weights(ema=role.ema is not None)

    def evaluate(self, evaluator: Evaluator) -> None:
        weights = self.student_state()
        issues = []
        if self.env.is_main:
            pipe = self.plan.student_pipeline()
            self.plan.load_student(pipe, weights)
            home = next(pipe.parameters()).device
            pipe.to(self.env.device)  # the export copy may live in CPU memory between evaluations
            try:
                result = run_evaluation(evaluator, pipe, self.state.step, self.logger, self.run_dir)
            finally:
                pipe.to(home)
            issues = result.issues
            self.logger.log(self.state.step, {"stage": self.stages[self.state.stage].name, **result.record})
        issues = self.env.broadcast_object(issues)
        self.env.barrier()
        self._health["samples"] = issues
        self.report(issues)

    # ---------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Checkpoint everything (collective), export ``RUN/student`` (rank 0)."""
        st, env = self.state, self.env
        data = ckpt.CheckpointData(trainer={
            "recipe": self.plan.name, "step": st.step, "stage": st.stage, "data_position": st.data_position,
            "bad_streak": st.bad_streak, "world_size": env.world_size,
            "roles": {r.name: {"updates": r.updates} for r in self.roles.values()},
            "health": self.monitor.state_dict()})
        for role in self.roles.trainable():
            data.tensors[f"roles/{role.name}"] = role.weights()
            if role.ema is not None:
                data.tensors[f"ema/{role.name}"] = role.weights(ema=True)
            if role.updates > 0:  # an unstepped optimizer has no state (and must not be faked)
                state = role.optimizer_state()
                if env.is_main:
                    tensors, meta = ckpt.flatten_optimizer_state(state)
                    data.tensors[f"optim/{role.name}"], data.json[f"optim/{role.name}"] = tensors, meta
        for stage in self.stages:
            for obj in stage.objectives:
                if state := obj.state_dict():
                    data.tensors[f"objectives/{stage.name}.{obj.name}"] = state
        for rank, rng in enumerate(env.all_gather_object(ckpt.capture_rng())):
            data.json[f"rng/rank{rank}"] = rng
        if env.is_main:
            data.config_yaml = (self.run_dir / "config.yaml").read_text()
            ckpt.write_checkpoint(self.run_dir, st.step, data, self.cfg.train.keep_checkpoints)
        self.export_student(data.tensors.get("ema/student", data.tensors.get("roles/student")))
        st.saved_step = st.step

    def export_student(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``RUN/student`` (a loadable model with the student's EMA or live weights)."""
        if "student" not in self.roles:
            return
        weights = self.student_state() if weights is None else weights
        if self.env.is_main and (pipe := self.plan.student_pipeline()) is not None:
            self.plan.load_student(pipe, weights)
            pipe.save(self.run_dir / "student")
            # after the model is in place: run.json never claims a step the directory lacks
            record_student(self.run_dir, self.state.step, self.cfg.train.steps)
            self._student_step = self.state.step
        self.env.barrier()

    def student_is_current(self) -> bool:
        """Whether ``RUN/student`` already holds the weights of the current step (rank 0 decides,
        every rank learns: the export it saves is collective)."""
        current = False
        if self.env.is_main and "student" in self.roles:
            record = student_record(self.run_dir / "student")
            current = (record is not None and record["step"] == self.state.step
                       and (self.run_dir / "student").is_dir())  # written atomically: complete if there
            if current:
                self._student_step = self.state.step
        return bool(self.env.broadcast_object(current))

    def restore(self, data: ckpt.CheckpointData) -> None:
        """Load a checkpoint into the freshly built roles (every rank reads the files)."""
        t, env, where = data.trainer, self.env, f"checkpoint of step {data.trainer.get('step')}"
        for index in range(t["stage"] + 1):  # replay stage hooks so modules match the checkpoint
            self.plan.start_stage(index, self.roles)
        try:
            for role in self.roles.trainable():
                role.load_weights(data.tensors[f"roles/{role.name}"], env)
                if role.ema is not None:
                    role.load_weights(data.tensors[f"ema/{role.name}"], env, ema=True)
                role.updates = t["roles"][role.name]["updates"]
                if f"optim/{role.name}" in data.json:
                    state = ckpt.unflatten_optimizer_state(data.tensors.get(f"optim/{role.name}", {}),
                                                           data.json[f"optim/{role.name}"])
                    role.load_optimizer_state(state)
            for stage in self.stages:
                for obj in stage.objectives:
                    if (key := f"objectives/{stage.name}.{obj.name}") in data.tensors:
                        obj.load_state_dict(data.tensors[key])
        except (KeyError, RuntimeError, ValueError) as err:
            detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(f"{where} does not match this run's roles ({detail})") from None
        rng = data.json.get(f"rng/rank{env.rank}", data.json.get("rng/rank0"))
        if rng is not None:
            ckpt.restore_rng(rng)
        self.monitor.load_state_dict(t.get("health", {}))
        self.state = TrainState(step=t["step"], stage=t["stage"], data_position=t["data_position"],
                                bad_streak=t["bad_streak"], saved_step=t["step"])


def train(plan: Plan, run_dir: Path, *, resume_from: Path | None = None, config_yaml: str,
          overwrite: bool = False, resuming_here: bool = False) -> TrainState:
    """Run (or continue) training of ``plan`` into ``run_dir``; joins torchrun's process group."""
    train_cfg = plan.config.train
    env = init_distributed(train_cfg.device, train_cfg.distributed, train_cfg.bf16, train_cfg.cpu_offload)
    flush = train_cfg.flush_denormal and torch.set_flush_denormal(True)  # process-wide; undone below
    finished = False
    try:
        trainer = Trainer(plan, run_dir, env)
        trainer.flush_denormal = bool(flush)
        state = trainer.run(resume_from, config_yaml, overwrite=overwrite, resuming_here=resuming_here)
        finished = True
        return state
    finally:
        if flush:
            torch.set_flush_denormal(False)
        env.close(wait_for_others=finished)  # a failing rank must not wait for ranks that never come
