"""The two CPU benchmark scripts still run end to end (each form in its own worker process) and write
JSON with a positive rate for every form, at a toy size: a check that they work, not a timing."""
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TOY = ["--batch", "1", "--length", "24", "--d-model", "16", "--heads", "2", "--head-dim", "8",
       "--chunk", "8", "--repeats", "1", "--threads", "1"]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *TOY, *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_chunked_vs_reference_times_both_forms(tmp_path):
    report = tmp_path / "cvr.json"
    done = _run("chunked_vs_reference.py", "--specs", "deltanet", "transformer", "--json", str(report))
    data = json.loads(report.read_text())
    assert data["complete"] and [r["spec"] for r in data["rows"]] == ["deltanet", "transformer"]
    delta, transformer = data["rows"]
    assert transformer["skipped"] == "no memory level"
    for form in ("chunked", "reference"):
        assert "errors" not in delta[form], delta[form]
        assert delta[form]["forward_tok_s"] > 0 and delta[form]["train_tok_s"] > 0
        assert delta[form]["output_finite"]
    assert delta["speedup_train"] == delta["chunked"]["train_tok_s"] / delta["reference"]["train_tok_s"]
    assert "deltanet" in done.stdout and "transformer        no memory level: skipped" in done.stdout


def test_chunked_vs_reference_reports_failed_forms(tmp_path):
    """Under an address-space cap too small for a worker, every form fails with its reason, and the
    run still completes and writes its report."""
    report = tmp_path / "cvr.json"
    _run("chunked_vs_reference.py", "--specs", "deltanet", "--memory-limit-gib", "0.05",
         "--json", str(report))
    data = json.loads(report.read_text())
    (row,) = data["rows"]
    assert data["complete"] and row["speedup_forward"] is None and row["speedup_train"] is None
    for form in ("chunked", "reference"):
        assert row[form]["forward_tok_s"] is None and row[form]["train_tok_s"] is None
        assert row[form]["errors"]["forward_tok_s"].startswith("worker exit")


def test_peers_runs_nlc_rows(tmp_path):
    report = tmp_path / "peers.json"
    _run("peers.py", "--only", "nlc-deltanet", "nlc-deltanet-ref", "--json", str(report))
    rows = {r["name"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"nlc-deltanet", "nlc-deltanet-ref"}
    for row in rows.values():
        assert row["forward"]["tok_s"] > 0 and row["train"]["tok_s"] > 0
