"""Where a run's trials live: Optuna's RDB storage, SQLite under the run folder by default (no
server) or any SQLAlchemy URL (postgresql://...) shared by workers on many machines.

Workers send a heartbeat; a trial whose worker stopped beating (killed, even with SIGKILL) for longer
than the grace period is marked failed by the next worker that starts a trial, and re-queued with the
same parameters (at most MAX_RETRY times), unless it had recorded its result. Finished trials are
never re-run."""
from __future__ import annotations

import fcntl
import functools
import os
import time
import warnings
from pathlib import Path

MAX_RETRY = 3
SCHEMA_ATTEMPTS = 5  # processes opening a new database at once: all but one retry once it exists
# seconds between heartbeats and before a silent trial counts as dead ("interval,grace")
HEARTBEAT_ENV = "NLC_EXPLORE_HEARTBEAT"
DEFAULT_HEARTBEAT = (10, 30)


def url(out: Path, storage: str | None) -> str:
    """The storage URL: the given one, or SQLite at OUT/study.db."""
    if storage:
        return storage
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out / 'study.db').resolve()}"


def heartbeat() -> tuple[int, int]:
    text = os.environ.get(HEARTBEAT_ENV)
    if not text:
        return DEFAULT_HEARTBEAT
    interval, grace = (int(x) for x in text.split(","))
    return interval, grace


def recorded(trial) -> bool:
    """A trial that ran to an end (ok, failed or pruned) and recorded it. A worker killed after the
    record was written and before Optuna marked the trial finished leaves it failed but recorded."""
    return trial.state.is_finished() and "status" in trial.user_attrs


def _RequeueUnrecorded(max_retry: int):
    import optuna

    class Requeue(optuna.storages.RetryHeartbeatStaleTrialCallback):
        """Re-queue a dead worker's trial unless its record was already complete (no second run)."""

        def __call__(self, study, trial):
            if "status" not in trial.user_attrs:
                super().__call__(study, trial)

    return Requeue(max_retry=max_retry)


def fail_unstarted_trials(study) -> None:
    """Fail (and re-queue, as a stale trial) every running trial whose worker died before its first
    heartbeat: Optuna's `fail_stale_trials` judges only trials that have one, so a worker killed
    between claiming a trial and its first beat would leave it running for ever, and a run waiting
    for it would wait for ever. Such a trial has no user attribute (the objective sets "point" first,
    milliseconds after the claim) and started more than the grace period ago."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    grace = heartbeat()[1]
    now = datetime.datetime.now()  # Optuna stamps datetime_start in local time
    store = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs or trial.datetime_start is None or \
                (now - trial.datetime_start).total_seconds() <= grace:
            continue
        try:
            failed = store.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it first
            continue
        if failed:
            store.get_heartbeat_stale_trial_callback()(study, store.get_trial(trial._trial_id))


def open_storage(storage_url: str):
    """An RDBStorage with heartbeats and re-queueing of dead trials."""
    import optuna

    import sqlalchemy.exc

    interval, grace = heartbeat()
    engine = {"connect_args": {"timeout": 120}} if storage_url.startswith("sqlite") else \
        {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _RequeueUnrecorded(max_retry=MAX_RETRY)
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(storage_url, engine_kwargs=engine,
                                                  heartbeat_interval=interval, grace_period=grace,
                                                  heartbeat_stale_trial_callback=retry)
            except sqlalchemy.exc.IntegrityError:  # another process stamped the new schema first
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))


def serialize_claims(study, lock: Path) -> None:
    """SQLite: make `study.ask` (which claims a queued trial) one process at a time through a file
    lock. Optuna claims with SELECT ... FOR UPDATE, which SQLite ignores, so two workers could claim
    the same queued trial; PostgreSQL locks the row itself."""
    ask = study.ask

    @functools.wraps(ask)
    def locked(*args, **kwargs):
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return ask(*args, **kwargs)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    study.ask = locked
