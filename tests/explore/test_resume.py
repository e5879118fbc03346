"""Resuming: `nlc explore` killed with SIGKILL in the middle of a trial, then the same command again,
finishes the grid without losing or repeating a finished trial."""
import os
import signal
import subprocess
import sys
import time

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from nlc.explore import storage

from .conftest import TINY_ARGS


def _trials(out):
    """The run's trials so far; none while the run is still creating its database (opening it here
    at that moment races the run's own schema set-up: a unique-constraint error on alembic_version)."""
    url = storage.url(out, None)
    try:
        names = optuna.get_all_study_names(url) if (out / "study.db").exists() else []
        if not names:
            return []
        return optuna.load_study(study_name=names[0], storage=url).get_trials()
    except sqlalchemy.exc.SQLAlchemyError:
        return []


def _kill_mid_trial(command, env, out):
    """Start the run and SIGKILL it while a trial trains after another has finished. Returns the
    finished trials and the killed one, or None when the kill landed after the running trial had
    written its record (then the run is not mid-trial, and the caller starts over)."""
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 150
    while time.time() < deadline and first.poll() is None:
        trials = _trials(out)
        done = [t for t in trials if storage.recorded(t)]
        running = [t for t in trials if t.state == TrialState.RUNNING and "status" not in t.user_attrs]
        if done and running:
            break
        time.sleep(0.2)
    assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read()}"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = {t.number: t for t in _trials(out) if storage.recorded(t)}
    (killed,) = [t for t in _trials(out) if t.state == TrialState.RUNNING]
    return None if "status" in killed.user_attrs else (before, killed)


def test_sigkill_mid_trial_then_resume(tiny_spec, tmp_path):
    env = {**os.environ, storage.HEARTBEAT_ENV: "1,2"}
    # a trial trains for about two seconds at 400 steps, so the kill rarely lands in the moment
    # between a trial's record and Optuna marking it finished; a kill there is tried again
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        command = [sys.executable, "-m", "nlc", "explore", str(tiny_spec), *TINY_ARGS, "--out", str(out),
                   "--steps", "400"]
        killed = _kill_mid_trial(command, env, out)
        if killed:
            break
    assert killed, "every kill landed after the running trial's record"
    before, killed = killed

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr

    trials = _trials(out)
    finished = [t for t in trials if storage.recorded(t)]
    assert sorted(t.user_attrs["point"]["bias"] for t in finished) == ["dot", "l2", "lp(p = 3)"]
    for number, t in before.items():  # finished trials are kept as they were
        assert trials[number].datetime_complete == t.datetime_complete
        assert trials[number].user_attrs == t.user_attrs
    assert trials[killed.number].state == TrialState.FAIL
    assert "status" not in trials[killed.number].user_attrs
    retried = [t for t in finished if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params


def test_a_trial_claimed_by_a_worker_that_died_before_its_first_heartbeat_is_requeued(tmp_path, monkeypatch):
    """Optuna judges only trials with a heartbeat: one claimed by a worker killed before its first beat
    (no user attribute) is failed and re-queued once it is older than the grace period, not left
    running for ever; a trial claimed within the grace period is left alone."""
    monkeypatch.setenv(storage.HEARTBEAT_ENV, "1,1")
    study = optuna.create_study(storage=storage.open_storage(storage.url(tmp_path, None)), study_name="s")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    time.sleep(1.5)
    live = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.fail_unstarted_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[live.number].state == TrialState.RUNNING
    (queued,) = [t for t in trials if t.state == TrialState.WAITING]
    assert queued.params == dead.params and queued.system_attrs["failed_trial"] == dead.number
