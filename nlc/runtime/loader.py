"""Import generated modules from the cache folder as one package, without the spec."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_package(folder: Path) -> ModuleType:
    """Import <folder>/__init__.py as package `nlc_generated_<folder name>`; its files import each
    other relatively. Loading the same folder twice returns the same modules."""
    name = "nlc_generated_" + "".join(ch if ch.isalnum() else "_" for ch in folder.name)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_module(folder: Path, module: str) -> ModuleType:
    package = load_package(folder)
    return importlib.import_module(f"{package.__name__}.{module}")
