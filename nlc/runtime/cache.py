"""The cache of generated sources: one folder per (spec, nlc version, codegen sources, torch version)
hash, holding real .py files that import without the spec. Beside each folder: `<folder>.sha256`, a
manifest of its files' hashes (sha256sum format), and `<folder>.lock`. Writers take the lock, write
each file to a temporary name and rename it into place, and write the manifest last; `damaged` finds
files that no longer match their manifest. An unwritable cache root falls back to a private
temporary folder, with a warning."""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

import nlc


class CacheWarning(UserWarning):
    """The cache root cannot be written; a temporary folder is used instead."""


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
    """Write `sources` into <root>/<name>-<digest>/ and its manifest; return the folder. Files that
    already hold the right text are left alone; damaged or missing ones are rewritten."""
    try:
        return _store(cache_root(), name, digest, sources)
    except OSError as exc:
        fallback = _temporary_root()
        warnings.warn(f"nlc: cannot write the cache at {cache_root()} ({exc.strerror or exc}); "
                      f"using {fallback} for this process (set NLC_CACHE_DIR to a writable folder)",
                      CacheWarning, stacklevel=3)
        return _store(fallback, name, digest, sources)


def damaged(folder: Path) -> list[str]:
    """Files of a cache folder that are missing or differ from its manifest (all of them when the
    manifest itself is missing or unreadable)."""
    manifest = _manifest_path(folder)
    try:
        expected = _parse_manifest(manifest.read_text())
    except (OSError, ValueError):
        return sorted(p.name for p in folder.glob("*.py")) or ["(manifest)"]
    bad = []
    for file, digest in expected.items():
        try:
            if _sha256((folder / file).read_bytes()) != digest:
                bad.append(file)
        except OSError:
            bad.append(file)
    return bad


def restore(folder: Path, sources: dict[str, str]) -> Path:
    """Rewrite the damaged files of a cache folder from `sources` (see `damaged`)."""
    if damaged(folder):
        name, digest = folder.name.rsplit("-", 1)
        return store(name, digest, sources) if folder.parent == cache_root() else \
            _store(folder.parent, name, digest, sources)
    return folder


def _store(root: Path, name: str, digest: str, sources: dict[str, str]) -> Path:
    folder = root / f"{name}-{digest}"
    encoded = {file: text.encode() for file, text in sources.items()}
    manifest = "".join(f"{_sha256(data)}  {file}\n" for file, data in sorted(encoded.items()))
    if _holds(folder, manifest):  # also serves a read-only cache that already has the entry
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        changed = False
        for file, data in encoded.items():
            target = folder / file
            if target.is_file() and _sha256(target.read_bytes()) == _sha256(data):
                continue
            _atomic_write(folder, target, data)
            changed = True
        path = _manifest_path(folder)
        if changed or not path.is_file() or path.read_text() != manifest:
            _atomic_write(root, path, manifest.encode())
    return folder


def _holds(folder: Path, manifest: str) -> bool:
    """Whether `folder` has exactly this manifest and every file matches it."""
    try:
        return _manifest_path(folder).read_text() == manifest and not damaged(folder)
    except OSError:
        return False


def _atomic_write(folder: Path, target: Path, data: bytes) -> None:
    """Write to a temporary file in `folder`, flush it to disk, then rename it over `target`: a
    reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on <folder>.lock: one writer per cache entry at a time."""
    with open(folder.parent / f"{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _manifest_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.sha256"


def _parse_manifest(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, sep, file = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"bad manifest line {line!r}")
        out[file] = digest
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=1)
def _temporary_root() -> Path:
    """A private folder (mode 0700) for this process's cache when the cache root is unwritable."""
    return Path(tempfile.mkdtemp(prefix="nlc-cache-"))
