"""nlc: a compiler for nested-optimization sequence models.

    program = nlc.compile("specs/titans.nl", chunk=16)
    layer = program.layer()            # nn.Module, [B, T, d_model] -> [B, T, d_model]
    o, state = program.op("memory")(q, k, v, theta=..., eta=..., alpha=...)
"""
__version__ = "0.1.0"

from .diagnostics import Diagnostic, SpecError  # noqa: E402
from .program import Program, compile  # noqa: E402

__all__ = ["compile", "Program", "SpecError", "Diagnostic", "__version__"]
