"""The training loop: exact resume, atomic checkpoints, the run folder, the schedule, the CLI."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from nlc.cli import main
from nlc.train import RunError, load_run, train
from nlc.train.loop import CHECKPOINT, lr_factor


def _weights(folder):
    return torch.load(folder / CHECKPOINT, weights_only=True)["model"]


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_resume_is_exact(config, tmp_path):
    """6 steps straight == killed after step 5 (last checkpoint at 3) + resumed to 6, bit for bit."""
    straight = dataclasses.replace(config, out=str(tmp_path / "straight"))
    split = dataclasses.replace(config, out=str(tmp_path / "split"))
    _, whole = train(straight)
    _, stopped = train(split, stop_at=5)
    assert stopped["step"] == 5 and "val_loss" not in stopped
    assert torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)["step"] == 3
    assert len(_losses(tmp_path / "split")) == 5
    model, resumed = train(split, resume=True)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")  # the log was cut back to 3
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())
    assert resumed["val_loss"] == whole["val_loss"] and resumed["tokens"] == whole["tokens"] == 6 * 2 * 16


def test_run_folder(config):
    _, summary = train(config)
    out = Path(config.out)
    for name in ("config.json", CHECKPOINT, "log.jsonl", "log.csv", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    header = (out / "log.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,grad_norm,tokens,tokens_per_s,elapsed_s"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    model, saved, data = load_run(out)
    assert saved == config and data.vocab_size == 256 and not model.training
    assert all(torch.equal(v, _weights(out)[k]) for k, v in model.state_dict().items())


def test_resume_refuses_other_settings(config):
    train(config, stop_at=3)
    with pytest.raises(RunError, match=r"changed: lr \(0.003 saved, 0.01 now\)"):
        train(dataclasses.replace(config, lr=1e-2), resume=True)
    with pytest.raises(RunError, match="already holds a run"):
        train(config)


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, steps=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, steps=100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_cli_train_and_eval(config, capsys):
    args = ["train", config.spec, "--data", config.data, "--steps", "2", "--out", config.out,
            "--batch", "2", "--seq-len", "16", "--layers", "1", "--quiet"]
    args += [f"--set={k}={v}" for k, v in config.overrides.items()]
    assert main(args) == 0
    assert "2 steps, 64 tokens" in capsys.readouterr().out
    assert main(["eval", config.out, "--needle-lengths", "260", "--trials", "1", "--val-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "depth 50%" in out and "\n        260 |" in out
    assert json.loads((Path(config.out) / "eval.json").read_text())["needle"]
    assert main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "changed: lr" in capsys.readouterr().err


def test_cli_eval_untrained_spec(config, capsys):
    args = ["eval", config.spec, "--data", config.data, "--layers", "1", "--seq-len", "16",
            "--needle-lengths", "260", "--trials", "1", "--val-tokens", "64"]
    assert main(args + [f"--set={k}={v}" for k, v in config.overrides.items()]) == 0
    assert "needle recall" in capsys.readouterr().out
    assert main(["eval", config.spec]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_trains_on_a_synthetic_task(config):
    task = dataclasses.replace(config, data="task:mqar:kv_pairs=4:vocab=64", seq_len=32, steps=2)
    model, summary = train(task)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)
    assert summary["tokens"] == 2 * 2 * 32
    assert "val_bpb" not in summary and 0 <= summary["val_accuracy"] <= 1


def test_divergence_stops_the_run(config):
    with pytest.raises(RunError, match="diverged"):
        train(dataclasses.replace(config, lr=float("inf")))


def test_a_crash_while_writing_a_checkpoint_leaves_the_last_one_whole(config, monkeypatch):
    """torch.save dying half-way through the step-6 checkpoint (after writing part of the file)
    leaves the step-3 checkpoint loadable, and the run resumes from it."""
    train(config, stop_at=3)
    folder = Path(config.out)
    before = (folder / CHECKPOINT).read_bytes()
    real_save = torch.save

    def dying_save(obj, target, *args, **kwargs):
        target.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, resume=True)
    assert (folder / CHECKPOINT).read_bytes() == before
    assert torch.load(folder / CHECKPOINT, weights_only=True)["step"] == 3
    monkeypatch.setattr(torch, "save", real_save)
    _, summary = train(config, resume=True)
    assert summary["step"] == 6


def test_training_in_recomputed_segments(config, tmp_path, capsys):
    """recompute=8 (two segments of the 16-byte windows) trains the same steps as the whole window;
    a length that is not a positive number of tokens is a usage error."""
    whole = dataclasses.replace(config, steps=2, out=str(tmp_path / "whole"))
    pieces = dataclasses.replace(whole, recompute=8, out=str(tmp_path / "pieces"))
    train(whole), train(pieces)
    assert _losses(Path(pieces.out)) == pytest.approx(_losses(Path(whole.out)), rel=1e-6)
    args = ["train", config.spec, "--data", config.data, "--steps", "1", "--out", str(tmp_path / "bad"),
            "--layers", "1", "--quiet", "--recompute", "0"] + [f"--set={k}={v}" for k, v in config.overrides.items()]
    assert main(args) == 2
    assert "recompute=0: expected a positive number of tokens per segment" in capsys.readouterr().err
