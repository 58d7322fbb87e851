"""The generic training engine (DESIGN §1, §5): it knows roles, objectives, stages and cadence,
never a method, a model family, a data source or a benchmark (the recipe hands those over).

==================  ==========================================================================
``config``          TrainConfig (keys every recipe has), StageConfig, EngineConfig (+ validation)
``roles``           RoleSpec / OptimConfig, the runtime Role (module, optimizer, EMA, warm-up)
``ema``             EMA copy of a module
``data``            position-addressed data stream (DataSource) and the Prefetcher that runs it ahead
``trainer``         the loop: one step = data → role updates by cadence → log / eval / checkpoint
``checkpoint``      safetensors + JSON checkpoints, atomic writes, verified reads, RNG states
``distributed``     torchrun process group, in-place DDP (replicate) / FSDP2 (fully_shard)
``health``          collapse / divergence detectors and their monitor
``evaluation``      the periodic-evaluation driver (Evaluator protocol, RUN/evals reports)
``logging``         metrics.jsonl, TensorBoard, progress line (rank 0)
``rundir``          what a run directory holds; checks before anything is written
==================  ==========================================================================
"""
