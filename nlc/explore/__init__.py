"""Design-space exploration: `nlc explore SPEC --task mqar` trains every (or a sampled) point of a
spec's `space` on a synthetic task and records quality, speed and state size; `nlc report` ranks them.

    tasks.py    synthetic tasks (MQAR, forgetting-MQAR, MAD's six), generated locally with fixed seeds
    trainer.py  a compact trainer: train a causal LM on a task, accuracy per difficulty slice
    points.py   the points of a space: Optuna parameters and the spec text of one point
    trial.py    one trial: compile the point, learning-rate sweep, evaluate, record
    storage.py  Optuna RDB storage: SQLite under the run folder, or a PostgreSQL URL
    search.py   the search: grid, TPE or NSGA-II, pruning, worker processes, resuming
    report.py   ranked table, CSV/JSON, Pareto and per-axis plots, best points as spec files
"""
