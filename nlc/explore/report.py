"""`nlc report DIR`: every study in a run's storage as a ranked table (rich), results.csv and
results.json, a Pareto plot (accuracy vs tokens/s, marker area ~ state size), per-axis effect plots
(mean accuracy per choice of each axis) and the best points as ordinary spec files, under
DIR/<study>/."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from . import storage

BEST = 3  # how many of the most accurate points are written out as specs (plus the Pareto front)


def rows(study) -> list[dict]:
    """One flat row per finished trial, best accuracy first; failed and pruned ones last."""
    out = []
    for t in study.get_trials(deepcopy=False):
        record = t.user_attrs.get("record", {})
        if not storage.recorded(t) or "copy_of" in record:  # a sampler's repeat of a point
            continue
        row = {"trial": t.number, "status": t.user_attrs["status"], **t.user_attrs.get("point", {})}
        for key in ("accuracy", "test_bits", "tokens_per_s", "state_size", "params", "lr", "seconds"):
            row[key] = record.get(key)
        row.update({f"acc[{k}]": v for k, v in record.get("slices", {}).items()})
        row["error"] = record.get("error", "") or ("" if row["status"] != "pruned" else "pruned")
        row["spec"] = record.get("spec")
        out.append(row)
    return sorted(out, key=lambda r: (r["status"] != "ok", -(r["accuracy"] or 0), r["trial"]))


def pareto(ok: list[dict]) -> list[dict]:
    """Points no other point beats on accuracy, tokens/s and state size at once."""
    def beats(a, b):
        ge = (a["accuracy"] >= b["accuracy"] and a["tokens_per_s"] >= b["tokens_per_s"]
              and a["state_size"] <= b["state_size"])
        gt = (a["accuracy"] > b["accuracy"] or a["tokens_per_s"] > b["tokens_per_s"]
              or a["state_size"] < b["state_size"])
        return ge and gt
    return [r for r in ok if not any(beats(o, r) for o in ok)]


def report(out: Path, storage_url: str | None = None, console=None) -> list[Path]:
    """Write the report of every study in the run; returns the folders written."""
    import optuna
    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else 200)  # files: no wrapping
    url = storage.url(out, storage_url)
    names = optuna.get_all_study_names(storage=storage.open_storage(url))
    if not names:
        raise ValueError(f"no study in {url}")
    folders = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage.open_storage(url))
        folder = out / _safe(name)
        folder.mkdir(parents=True, exist_ok=True)
        table = rows(study)
        axes = _axes(table)
        _print(console, name, table, axes)
        _write_tables(folder, table)
        ok = [r for r in table if r["status"] == "ok"]
        if ok:
            _plot_pareto(folder / "pareto", ok, axes)
            _plot_effects(folder / "effects", ok, axes)
            _write_best(folder / "best", ok)
        folders.append(folder)
    return folders


def _axes(table: list[dict]) -> list[str]:
    fixed = {"trial", "status", "accuracy", "tokens_per_s", "state_size", "params", "lr", "seconds",
             "error", "spec"}
    keys = []
    for r in table:
        keys += [k for k in r if k not in fixed and not k.startswith("acc[") and k not in keys]
    return keys


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _print(console, name: str, table: list[dict], axes: list[str]) -> None:
    from rich.table import Table

    slices = sorted({k for r in table for k in r if k.startswith("acc[")})
    t = Table(title=f"{name}: {sum(r['status'] == 'ok' for r in table)} ok of {len(table)} trials")
    for col in ["#", *axes, "accuracy", *slices, "test bits", "tokens/s", "state", "params", "lr", "status"]:
        t.add_column(col, justify="right" if col not in axes and col != "status" else "left")
    for rank, r in enumerate(table, 1):
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:60]}"
        t.add_row(str(rank), *[str(r.get(a, "")) for a in axes], _fmt(r["accuracy"]),
                  *[_fmt(r.get(s)) for s in slices], _fmt(r["test_bits"]), _fmt(r["tokens_per_s"]),
                  _fmt(r["state_size"]), _fmt(r["params"]), _fmt(r["lr"]), status)
    console.print(t)


def _write_tables(folder: Path, table: list[dict]) -> None:
    (folder / "results.json").write_text(json.dumps(table, indent=1, default=str))
    cols = []
    for r in table:
        cols += [k for k in r if k != "spec" and k not in cols]
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)


def _short(r: dict, axes: list[str]) -> str:
    return ", ".join(str(r.get(a)) for a in axes)


def _plot_pareto(path: Path, ok: list[dict], axes: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = {id(r) for r in pareto(ok)}
    biggest = max(r["state_size"] for r in ok)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in ok:
        on = id(r) in front
        ax.scatter(r["tokens_per_s"], r["accuracy"], s=30 + 400 * r["state_size"] / biggest,
                   alpha=0.6, color="tab:red" if on else "tab:blue", edgecolors="black")
        if on:
            ax.annotate(_short(r, axes), (r["tokens_per_s"], r["accuracy"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training tokens/s (this machine)")
    ax.set_ylabel("accuracy (mean over slices)")
    ax.set_title("accuracy vs speed; marker area ~ state size; red: Pareto front")
    _save(fig, path)


def _plot_effects(path: Path, ok: list[dict], axes: list[str]) -> None:
    """Mean (and each point's) accuracy per choice of every axis with more than one choice."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = [a for a in axes if len({str(r.get(a)) for r in ok}) > 1] or axes[:1]
    fig, subplots = plt.subplots(1, len(varied), figsize=(4.2 * len(varied), 4), squeeze=False)
    for ax, axis in zip(subplots[0], varied):
        choices = sorted({str(r.get(axis)) for r in ok})
        for i, c in enumerate(choices):
            accs = [r["accuracy"] for r in ok if str(r.get(axis)) == c]
            ax.scatter([i] * len(accs), accs, color="tab:blue", alpha=0.5, s=14)
            ax.bar(i, sum(accs) / len(accs), color="tab:orange", alpha=0.5)
        ax.set_xticks(range(len(choices)), choices, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"accuracy by {axis}")
        ax.set_ylim(0, 1.02)
    _save(fig, path)


def _save(fig, stem: Path) -> None:
    """Write a figure as stem.png and stem.svg."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=110)
    plt.close(fig)


def _write_best(folder: Path, ok: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.nl"):
        old.unlink()
    chosen = {r["trial"]: ("top", r) for r in ok[:BEST]}
    for r in pareto(ok):
        chosen.setdefault(r["trial"], ("pareto", r))
    for number, (why, r) in sorted(chosen.items()):
        (folder / f"trial{number}_{why}.nl").write_text(r["spec"])
