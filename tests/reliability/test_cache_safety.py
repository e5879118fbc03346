"""The cache under stress: processes and threads writing one entry at once leave one valid entry;
corrupted, truncated or missing files (and a missing manifest) are detected and rewritten; an
unwritable cache root falls back to a temporary folder with a warning."""
from __future__ import annotations

import multiprocessing
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch

import nlc
from nlc.runtime import cache

from .test_fuzz_frontend import level

SPECS = [level(lr=f"beta * {i + 1}") for i in range(4)]  # four entries, each written by every worker


def entry_is_valid(program) -> None:
    folder = program.cache_dir
    assert {p.name for p in folder.iterdir()} == set(program.sources), "stray or missing files"
    assert cache.damaged(folder) == []
    for name, text in program.sources.items():
        assert (folder / name).read_text() == text
    assert not [*folder.glob(".tmp-*"), *folder.parent.glob(".tmp-*")], "a temporary file was left"


def _compile_all(root: str, barrier) -> list[str]:
    os.environ["NLC_CACHE_DIR"] = root
    barrier.wait()
    return [str(nlc.compile(text).cache_dir) for text in SPECS]


def test_two_processes_compiling_at_once(tmp_path):
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(2)
        with context.Pool(2) as pool:
            folders = pool.starmap(_compile_all, [(str(root), barrier)] * 2)
    assert folders[0] == folders[1]
    os.environ["NLC_CACHE_DIR"], saved = str(root), os.environ["NLC_CACHE_DIR"]
    try:
        for text, folder in zip(SPECS, folders[0]):
            program = nlc.compile(text)
            assert str(program.cache_dir) == folder
            entry_is_valid(program)
    finally:
        os.environ["NLC_CACHE_DIR"] = saved
    assert len([p for p in root.iterdir() if p.is_dir()]) == len(SPECS)


def test_threads_never_read_half_a_file(tmp_path, monkeypatch):
    """Eight writers rewrite one entry whose files keep changing size while readers read them: every
    read is one whole version."""
    monkeypatch.setenv("NLC_CACHE_DIR", str(tmp_path))
    versions = [{"a.py": f"# {i}\n" + "x = 1\n" * (1000 * (i + 1)), "b.py": f"# {i}\n"} for i in range(8)]
    whole = {name: {v[name] for v in versions} for name in ("a.py", "b.py")}
    folder = cache.store("threads", "0" * 20, versions[0])
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            for name in whole:
                seen.append((name, (folder / name).read_text()))

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=cache.store, args=("threads", "0" * 20, v)) for v in versions * 3]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert seen and all(text in whole[name] for name, text in seen)
    assert cache.damaged(folder) == []


@pytest.fixture()
def program(tmp_path, monkeypatch):
    monkeypatch.setenv("NLC_CACHE_DIR", str(tmp_path / "cache"))
    return nlc.compile(SPECS[0])


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete", "empty", "manifest_gone"])
def test_damage_is_detected_and_repaired(program, damage):
    folder = program.cache_dir
    target = folder / "level_mem.py"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":
        target.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        target.unlink()
    elif damage == "empty":
        target.write_bytes(b"")
    else:
        (folder.parent / f"{folder.name}.sha256").unlink()
    assert cache.damaged(folder), f"{damage} went unnoticed"
    layer = program.layer()  # loading repairs first
    assert layer(torch.randn(1, 3, 16)).shape == (1, 3, 16)
    entry_is_valid(program)
    if damage != "manifest_gone":
        target.write_bytes(b"raise RuntimeError('damaged')\n")
        entry_is_valid(nlc.compile(SPECS[0]))  # a new compile repairs too


def _unwritable_roots(tmp_path):
    """Cache roots nothing can write: under a regular file; under /proc; a chmod 0555 folder (not
    for root, whom permissions do not stop)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    roots = [blocker / "cache", Path("/proc/nlc-cache")]
    if os.geteuid() != 0:
        locked = tmp_path / "read_only"
        locked.mkdir()
        locked.chmod(0o555)
        roots.append(locked / "cache")
    return roots


def test_unwritable_root_falls_back_with_a_warning(tmp_path, monkeypatch):
    for root in _unwritable_roots(tmp_path):
        monkeypatch.setenv("NLC_CACHE_DIR", str(root))
        with pytest.warns(cache.CacheWarning, match="cannot write the cache"):
            program = nlc.compile(SPECS[1])
        assert not program.cache_dir.is_relative_to(root)
        entry_is_valid(program)
        assert program.layer()(torch.randn(1, 3, 16)).shape == (1, 3, 16)


def test_read_only_root_with_the_entry_serves_it(tmp_path, monkeypatch):
    """A shared cache made read-only after it was filled is used as it is, without a warning."""
    monkeypatch.setenv("NLC_CACHE_DIR", str(tmp_path))
    first = nlc.compile(SPECS[2])
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = nlc.compile(SPECS[2])
    finally:
        for path in [tmp_path, *tmp_path.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert again.cache_dir == first.cache_dir
