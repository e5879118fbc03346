"""What each level field accepts: option kinds and their argument signatures. Meanings: grammar/README.md
and ../shared/reference/MATH.md. This table drives checking only; rules are derived in `nlc.derive`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    name: str
    type: str                    # scalar (number or gate expression) | int | number | enum | bool
    default: object = None       # None with required=True: must be given
    required: bool = False
    choices: tuple[str, ...] = ()
    doc: str = ""


def _a(name, type="scalar", default=None, required=False, choices=(), doc=""):
    return Arg(name, type, default, required, tuple(choices), doc)


MEMORY = {
    "matrix": (),
    "vector": (),
    "mlp": (_a("depth", "int", 2), _a("expand", "number", 4.0),
            _a("act", "enum", "gelu", choices=("gelu", "silu", "relu", "tanh")),
            _a("residual", "bool", None), _a("gated", "bool", False),
            _a("norm", "enum", "none", choices=("none", "layernorm")), _a("bias", "bool", False)),
}

BIAS = {
    "dot": (),
    "l2": (),
    "lp": (_a("p", required=True, doc="exponent; loss ||e||_p^p"),
           _a("eps", "number", 0.0, doc="smoothing: |x| ~ sqrt(x^2 + eps)")),
    "l1": (_a("eps", "number", 0.0),),
    "huber": (_a("delta", required=True),
              _a("form", "enum", "coord", choices=("coord", "norm", "mixture"))),
    "robust": (_a("shift", required=True, doc="value-shift radius Delta"),),
    "omega": (_a("window", "int", required=True), _a("gamma", default=1.0)),
}

RETENTION = {
    "none": (),
    "decay": (_a("rate", required=True, doc="multiplies the old state, in (0, 1]"),),
    "l2": (_a("global", required=True, doc="strength alpha of the global term (1/alpha)/2 ||W||^2"),),
    "lq": (_a("q", "number", required=True), _a("decay", default=1.0),
           _a("map", "enum", "exact", choices=("exact", "miras")),
           _a("apply", "enum", "token", choices=("token", "chunk"),
              doc="map every token, or at the chunk boundaries of gradient chunk_start(C)")),
    "kl": (_a("decay", default=None, doc="coefficient on log W (Memora's alpha)"),
           _a("global", default=None, doc="entropy strength alpha (derived coefficient)"),
           _a("axis", "enum", "row", choices=("row", "column")), _a("mass", "number", 1.0),
           _a("apply", "enum", "token", choices=("token", "chunk"),
              doc="softmax step every token, or at the first token of each chunk of gradient "
                  "chunk_start(C) with the same coefficients on W within it (the lag token)")),
    "elastic": (_a("l1", required=True), _a("l2", required=True)),
    "implicit": (),
    "dgd": (_a("decay", required=True, doc="alpha in (alpha I - eta k k^T)"),),
}

ALGORITHM = {
    "gd": (_a("lr", required=True),),
    "momentum": (_a("lr", required=True), _a("beta", required=True, doc="momentum decay")),
    "muon": (_a("lr", required=True), _a("beta", required=True), _a("steps", "int", 5)),
    "ftrl": (_a("lr", required=True),),
}

FAMILIES = {"memory": MEMORY, "bias": BIAS, "retention": RETENTION, "algorithm": ALGORITHM}

LEVEL_FIELDS = ("memory", "bias", "retention", "algorithm", "update", "gradient", "read", "init",
                "key", "value", "query")
READ_POINTS = ("after", "before")
INITS = ("zero", "learned")
GRADIENT_POINTS = ("current", "retained", "chunk_start")
