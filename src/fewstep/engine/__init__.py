"""The generic training engine (DESIGN §1, §5): it knows roles, objectives, stages and cadence,
never a method.

==================  ==========================================================================
``config``          TrainConfig (keys every recipe has), StageConfig, EngineConfig (+ validation)
``roles``           RoleSpec / OptimConfig, the runtime Role (module, optimizer, EMA, warm-up)
``ema``             EMA copy of a module
``data``            position-addressed data stream; ToyWorldSource (frames → latents, captions)
``trainer``         the loop: one step = data → role updates by cadence → log / eval / checkpoint
``checkpoint``      safetensors + JSON checkpoints, atomic writes, verified reads, RNG states
``distributed``     torchrun process group, in-place DDP (replicate) / FSDP2 (fully_shard)
``health``          collapse / divergence detectors and their monitor
``evaluation``      periodic toy-VBench evaluation of the (EMA) student
``logging``         metrics.jsonl, TensorBoard, progress line (rank 0)
``rundir``          what a run directory holds; checks before anything is written
==================  ==========================================================================
"""
