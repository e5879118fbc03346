"""nlc: a compiler for nested-optimization sequence models.

    program = nlc.compile("specs/titans.nl", chunk=16)
    layer = program.layer()            # nn.Module, [B, T, d_model] -> [B, T, d_model]
    o, state = program.op("memory")(q, k, v, theta=..., eta=..., alpha=...)

The compiler (and sympy, lark) load on first use of `compile`/`Program`, so generated modules that
import `nlc.runtime` stay light.
"""
__version__ = "0.1.0"

from .diagnostics import Diagnostic, SpecError  # noqa: E402

__all__ = ["compile", "Program", "SpecError", "Diagnostic", "check_finite", "NonFiniteError",
           "__version__"]


def __getattr__(name):
    if name in ("compile", "Program"):
        from . import program
        return getattr(program, name)
    if name in ("check_finite", "NonFiniteError"):  # nlc.runtime.finite
        from .runtime import finite
        return getattr(finite, name)
    raise AttributeError(f"module 'nlc' has no attribute {name!r}")
