"""The cache of generated sources: one folder per (spec, nlc version, codegen sources, torch version)
hash, written atomically, holding real .py files that import without the spec."""
from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

import nlc


def cache_root() -> Path:
    """$NLC_CACHE_DIR, else ~/.cache/nlc (read at call time)."""
    env = os.environ.get("NLC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "nlc"


@lru_cache(maxsize=1)
def codegen_fingerprint() -> str:
    """Hash of the code generator's own sources: a new generator never reuses old output.
    Read once per process (every compile asks)."""
    import nlc.codegen as codegen
    import nlc.derive as derive
    h = hashlib.sha256()
    for package in (codegen, derive):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()


def key(source: str, file: str, params: dict) -> str:
    """Everything the generated text depends on: the spec (its text, and its file name, which the
    sources quote), the overrides, and the versions of nlc, its generator and torch."""
    h = hashlib.sha256()
    for part in (source, file, repr(sorted(params.items())), nlc.__version__, codegen_fingerprint(),
                 torch.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def store(name: str, digest: str, sources: dict[str, str]) -> Path:
    """Write `sources` into <root>/<name>-<digest>/ (atomically per file); return the folder."""
    folder = cache_root() / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in sources.items():
        target = folder / file
        if target.exists() and target.read_text() == text:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".py")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    return folder
