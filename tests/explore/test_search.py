"""`nlc explore` and `nlc report` end to end on a tiny space: grid, TPE with invalid points, NSGA-II,
failed trials recorded, worker processes, and the report's files."""
import json
import re

import optuna
import pytest

import nlc
from nlc import cli
from nlc.explore import search, storage

from .conftest import TINY_ARGS


def explore(spec, out, *extra):
    return cli.main(["explore", str(spec), *TINY_ARGS, "--out", str(out), *extra])


def trials(out):
    url = storage.url(out, None)
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_grid_runs_each_point_once_and_reports(tiny_spec, tmp_path, capsys):
    out = tmp_path / "run"
    assert explore(tiny_spec, out) == 0
    done = trials(out)
    assert sorted(t.user_attrs["point"]["bias"] for t in done) == ["dot", "l2", "lp(p = 3)"]
    record = done[0].user_attrs["record"]
    assert record["status"] == "ok" and 0 <= record["accuracy"] <= 1
    assert set(record["slices"]) == {"kv=2", "kv=4"}
    assert record["state_size"] == 8 * 8 and record["params"] > 0 and record["tokens_per_s"] > 0
    assert record["versions"]["nlc"] == nlc.__version__ and record["seed"] == 0
    assert "space" not in record["spec"].split("\n", 1)[1]

    assert explore(tiny_spec, out) == 0, "a finished grid resumes to nothing"
    assert len(trials(out)) == 3

    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 ok of 3 trials" in printed and "lp(p = 3)" in printed
    folder = out / "tiny.tiny.mqar"
    rows = json.loads((folder / "results.json").read_text())
    assert len(rows) == 3 and rows[0]["accuracy"] >= rows[-1]["accuracy"]
    assert (folder / "results.csv").read_text().startswith("trial,status,bias,accuracy")
    for plot in ("pareto", "effects"):
        assert (folder / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (folder / f"{plot}.svg").read_bytes()[:1000]
    best = sorted((folder / "best").glob("*.nl"))
    assert best, "the best points are written out"
    for path in best:
        assert cli.main(["compile", str(path), "-o", str(tmp_path / "build" / path.stem)]) == 0


def test_failures_are_recorded_not_raised(tiny_spec, tmp_path):
    spec = tmp_path / "invalid.nl"
    spec.write_text(tiny_spec.read_text().replace(
        "bias in {dot, l2, lp(p = 3)}", "bias in {dot, l2}\n  retention in {none, kl(decay = 1)}"))
    out = tmp_path / "tpe"
    assert explore(spec, out, "--sampler", "tpe", "--trials", "6", "--lrs", "1e9") == 0
    done = trials(out)
    recorded = [t for t in done if "copy_of" not in t.user_attrs["record"]]
    assert len(recorded) == 4, "--trials 6 stops at the 4 points of the space, each recorded once"
    assert all(t.state == optuna.trial.TrialState.FAIL for t in done)
    errors = {t.user_attrs["record"]["error"].split(":")[0] for t in done}
    assert errors <= {"invalid point", "diverged"} and len(errors) == 2
    invalid = next(t for t in done if t.user_attrs["point"]["retention"] != "none")
    assert "KL retention keeps the memory on the simplex" in invalid.user_attrs["record"]["error"]


def test_a_sampler_coming_back_to_a_point_reuses_its_record(tiny_spec, tmp_path):
    """Copies do not count toward --trials: 2 trials are 2 distinct points trained; 5 (more than the
    space's 3 points) train each point once and stop."""
    out = tmp_path / "tpe"
    assert explore(tiny_spec, out, "--sampler", "tpe", "--trials", "2") == 0
    trained = [t for t in trials(out) if "copy_of" not in t.user_attrs["record"]]
    assert len({t.user_attrs["point"]["bias"] for t in trained}) == len(trained) == 2
    assert explore(tiny_spec, out, "--sampler", "tpe", "--trials", "5") == 0
    done = trials(out)
    trained = [t for t in done if "copy_of" not in t.user_attrs["record"]]
    assert sorted(t.user_attrs["point"]["bias"] for t in trained) == ["dot", "l2", "lp(p = 3)"]
    for t in done:
        if t not in trained:
            first = done[t.user_attrs["record"]["copy_of"]]
            assert t.user_attrs["point"] == first.user_attrs["point"] and t.value == first.value


def test_nsga2_records_three_objectives(tiny_spec, tmp_path):
    out = tmp_path / "nsga"
    assert explore(tiny_spec, out, "--sampler", "nsga2", "--trials", "2") == 0
    done = [t for t in trials(out) if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(len(t.values) == 3 for t in done)
    assert done[0].values[2] == 64  # state size of one 8 x 8 matrix


def test_workers_share_the_grid_without_duplicates(tiny_spec, tmp_path):
    out = tmp_path / "workers"
    assert explore(tiny_spec, out, "--workers", "2") == 0
    points = [t.user_attrs["point"]["bias"] for t in trials(out) if "status" in t.user_attrs]
    assert sorted(points) == ["dot", "l2", "lp(p = 3)"]


def test_a_changed_command_does_not_mix_into_an_old_run(tiny_spec, tmp_path, capsys):
    out = tmp_path / "run"
    assert explore(tiny_spec, out, "--trials", "1") == 0
    assert explore(tiny_spec, out, "--trials", "1", "--steps", "7") == 2
    assert "made with a different settings" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("45m", 2700), ("90s", 90), ("1h30m", 5400),
                                           ("12", 12)])
def test_budget_parses(text, seconds):
    assert search.parse_budget(text) == seconds


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_a_cuda_device_without_cuda_is_a_usage_error(tiny_spec, tmp_path, capsys):
    assert explore(tiny_spec, tmp_path / "run", "--device", "cuda") == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("kv_pairs=2;4", "invalid literal for int"),                   # a string where numbers belong
    ("kv_pairs=64", "mqar needs 4 \\* kv_pairs <= seq_len"),       # a number out of range
    ("pairs=2", "task mqar has no setting pairs"),
])
def test_a_bad_task_setting_stops_the_run_before_any_trial(tiny_spec, tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert explore(tiny_spec, out, "--task-arg", setting) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "study.db").exists() or not trials(out)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_trials_train_on_cuda(tiny_spec, tmp_path):
    out = tmp_path / "run"
    assert explore(tiny_spec, out, "--trials", "1", "--device", "cuda") == 0
    (trial,) = [t for t in trials(out) if t.state == optuna.trial.TrialState.COMPLETE]
    assert 0.0 <= trial.user_attrs["record"]["accuracy"] <= 1.0


def test_text_task_explores_byte_level_language_modelling(tiny_spec, tmp_path, capsys):
    """`--task text --task-arg path=FILE`: next-byte accuracy and test bits per byte, per point."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "text_run"
    args = ["explore", str(tiny_spec), "--task", "text", "--task-arg", f"path={corpus}",
            "--task-arg", "seq_len=32", "--steps", "6", "--batch", "8", "--lrs", "0.003",
            "--train-examples", "32", "--test-examples", "8", "--layers", "1", "--quiet",
            "--threads", "1", "--out", str(out)]
    assert cli.main(args) == 0
    records = [t.user_attrs["record"] for t in trials(out)]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert set(r["slices"]) == {"next_byte"} and r["task_args"]["path"] == str(corpus)
        assert 0 < r["test_bits"] < 16, "cross-entropy in bits per byte, below a few times log2(256)"
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert "test bits" in capsys.readouterr().out
