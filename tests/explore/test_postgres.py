"""The shared storage: a real PostgreSQL server started on loopback for this test (.ci/run installs
Debian's `postgresql`), two worker processes exploring through it, then `nlc report --storage`."""
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from nlc import cli

from .conftest import TINY_ARGS


def _server_binaries() -> str | None:
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(versions[-1]) if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway server on 127.0.0.1 (as the `postgres` user when running as root)."""
    pytest.importorskip("psycopg2", reason="psycopg2 is missing: pip install -e '.[explore]'")
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql, as .ci/run does")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="nlc-postgres-"))  # outside pytest's root-only temp folder
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a `postgres` user and runuser to start the server")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w",
                    "-o", f"-k {folder} -c listen_addresses=127.0.0.1 -p {port}", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_explore_through_postgres(postgres, tiny_spec, tmp_path):
    out = tmp_path / "run"
    start = time.time()
    assert cli.main(["explore", str(tiny_spec), *TINY_ARGS, "--out", str(out), "--storage", postgres,
                     "--workers", "2", "--trials", "2"]) == 0
    assert not (out / "study.db").exists(), "nothing is written to SQLite when a URL is given"
    (name,) = optuna.get_all_study_names(postgres)
    trials = optuna.load_study(study_name=name, storage=postgres).get_trials()
    done = [t.user_attrs["point"]["bias"] for t in trials if "status" in t.user_attrs]
    assert len(done) == len(set(done)) == 2
    assert all(t.datetime_start.timestamp() >= start - 5 for t in trials if t.datetime_start)
    assert cli.main(["report", str(out), "--storage", postgres]) == 0
    assert (out / name / "results.csv").is_file()
