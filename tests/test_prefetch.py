"""The engine's prefetcher: batches are prepared in a background thread, the next step's while a step
trains, and every batch is the one the source gives on the caller's thread — also across resume;
errors surface at the step that needs the batch; the thread stops cleanly."""

from __future__ import annotations

import threading

import pytest
import torch

from fewstep.engine.data import Prefetcher
from fewstep.engine.distributed import DistEnv
from fewstep.engine.trainer import Trainer
from fewstep.errors import UserError
from fewstep.recipes.base import recipe_class
from fewstep.recipes.sources import ToyWorldSource
from helpers import RUN, STEPS, TINY, assert_same_end, cli, make_tiny_pipeline, sets

Finetune = recipe_class("finetune")

CPU = torch.device("cpu")


def same_batch(a, b) -> bool:
    return (torch.equal(a.latents, b.latents) and torch.equal(a.cond.context, b.cond.context)
            and torch.equal(a.cond.mask, b.cond.mask) and torch.equal(a.uncond.context, b.uncond.context)
            and a.prompts == b.prompts and torch.equal(a.sample_ids, b.sample_ids))


class Recording:
    """Wraps a source: records each call's positions and thread; raises for positions in ``fail``."""

    def __init__(self, source, fail=()):
        self.source, self.fail, self.calls = source, set(fail), []

    def batch(self, positions, device):
        self.calls.append((tuple(positions), threading.current_thread().name))
        if self.fail & set(positions):
            raise UserError(f"sample {min(self.fail & set(positions))} is unreadable")
        return self.source.batch(positions, device)


def data_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("fewstep-data")}


@pytest.fixture
def new_data_threads():
    """``new_data_threads()``: the data threads started since the test began (other tests' trainers
    may leave theirs until they are garbage-collected)."""
    before = data_threads()
    return lambda: data_threads() - before


def test_prefetched_batches_are_the_synchronous_ones(new_data_threads):
    source = ToyWorldSource(make_tiny_pipeline(), seed=0)
    recording = Recording(source)
    steps = [range(4 * s, 4 * s + 4) for s in range(4)]
    with Prefetcher(recording, CPU) as prefetcher:
        got = [prefetcher.batch(pos, steps[i + 1] if i + 1 < len(steps) else None) for i, pos in enumerate(steps)]
    # the same as the source gives on this thread, with this thread's torch threads (the data thread uses one)
    assert all(same_batch(b, source.batch(pos, CPU)) for b, pos in zip(got, steps))
    # every batch, the first included, is computed once, in order, on the data thread
    assert [p for p, _ in recording.calls] == [tuple(p) for p in steps]
    assert all(name.startswith("fewstep-data") for _, name in recording.calls)
    assert not new_data_threads()  # closed: the thread is gone


def test_the_data_thread_uses_its_own_thread_count():
    seen = []
    with Prefetcher(type("Probe", (), {"batch": lambda self, p, d: seen.append(torch.get_num_threads())})(), CPU,
                    threads=1) as prefetcher:
        prefetcher.batch([0])
    assert seen == [1]


def test_a_different_request_drops_the_prefetched_batch():
    """After a jump (a resume, a changed schedule) the batch asked for is computed, not the stale one."""
    source = ToyWorldSource(make_tiny_pipeline(), seed=0)
    with Prefetcher(source, CPU) as prefetcher:
        prefetcher.batch(range(0, 2), range(2, 4))
        jumped = prefetcher.batch(range(10, 12), range(12, 14))
        assert same_batch(jumped, source.batch(range(10, 12), CPU))
        assert same_batch(prefetcher.batch(range(12, 14)), source.batch(range(12, 14), CPU))


def test_errors_surface_at_the_step_that_needs_the_batch(new_data_threads):
    recording = Recording(ToyWorldSource(make_tiny_pipeline(), seed=0), fail={5})
    prefetcher = Prefetcher(recording, CPU)
    prefetcher.batch(range(0, 2), range(2, 4))
    prefetcher.batch(range(2, 4), range(4, 6))  # the failing batch is being prepared: nothing raised yet
    with pytest.raises(UserError, match="sample 5 is unreadable"):
        prefetcher.batch(range(4, 6), range(6, 8))
    prefetcher.close()
    prefetcher.close()  # idempotent
    assert not new_data_threads()
    # a failed batch nobody asks for is dropped with its error
    with Prefetcher(recording, CPU) as prefetcher:
        prefetcher.batch(range(0, 2), range(4, 6))
        assert same_batch(prefetcher.batch(range(8, 10)), recording.source.batch(range(8, 10), CPU))


def test_prefetch_auto_needs_a_free_core(teacher_dir, tmp_path, monkeypatch):
    cfg = Finetune.load_config(None, [f"model={teacher_dir}", *TINY])
    assert cfg.train.prefetch == "auto"
    trainer = Trainer(Finetune(cfg), tmp_path / "run", DistEnv())
    for spare, expected in ((0, False), (1, True)):
        monkeypatch.setattr("fewstep.engine.trainer.spare_cores", lambda spare=spare: spare)
        assert trainer.prefetching() is expected
    trainer.cfg.train.prefetch = False
    assert trainer.prefetching() is False


def test_training_with_and_without_prefetch_is_identical(teacher_dir, tmp_path, new_data_threads):
    records, weights = {}, {}
    for prefetch in (True, False):
        cfg = Finetune.load_config(None, [f"model={teacher_dir}", *TINY, f"train.prefetch={prefetch}"])
        trainer = Trainer(Finetune(cfg), tmp_path / f"run{prefetch}", DistEnv())
        try:
            records[prefetch] = [trainer.train_step() for _ in range(cfg.train.steps)]
            assert bool(new_data_threads()) == prefetch  # False: the step read its batches itself
        finally:
            trainer.close()
        weights[prefetch] = trainer.roles["student"].module.state_dict()
    assert records[True] == records[False]
    assert all(torch.equal(weights[True][k], v) for k, v in weights[False].items())
    assert not new_data_threads()


def test_resume_with_prefetch_is_exact(reference_run, teacher_dir, tmp_path, capsys, new_data_threads):
    """Stopped at step 3 of a prefetching run and resumed with the prefetcher on or off: the end state
    is the uninterrupted run's (``train.prefetch: auto``), bit for bit."""
    for prefetch in ("true", "false"):
        run = tmp_path / f"run_{prefetch}"
        rc, _, err = cli(capsys, "distill", "--recipe", "finetune", "--out", run,
                         *sets(teacher_dir, *RUN, "train.steps=3", "train.prefetch=true"))
        assert rc == 0, err
        rc, _, err = cli(capsys, "distill", "--resume", run, "--set", f"train.steps={STEPS}",
                         "--set", f"train.prefetch={prefetch}")
        assert rc == 0, err
        assert_same_end(run, reference_run)
    assert not new_data_threads()
