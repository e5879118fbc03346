"""Fuzzing the front end. Property: every spec text either checks or raises nlc.SpecError whose
errors carry file, line and column; nothing else escapes (no lark, sympy or Python error) and no
case takes a second of CPU to diagnose. Specs: tests/reliability/spec_strategies.py. The default run
is FUZZ_CASES (>= 2,000) front-end cases plus a sample compiled through codegen, drawn the same way
in every run (derandomised: a CI failure reproduces); `--fuzz-long` multiplies every count by 10 and
draws new cases each run. Bugs the fuzzing found are pinned in REGRESSIONS."""
from __future__ import annotations

import ast as pyast
import signal
import time
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings

import nlc
from nlc import graph
from nlc.derive.rules import derive
from nlc.diagnostics import SpecError
from nlc.lower import check
from nlc.parse import MAX_CODE, MAX_DEPTH
from nlc.plan import plan

from .spec_strategies import SHIPPED, declarations, field_edits, mutated, shipped_specs

FILE = "fuzz.nl"
LIMIT_S = 1.0  # CPU seconds to diagnose one spec
HANG_S = 20    # wall seconds after which a case counts as stuck
FUZZ_CASES = {"declarations": 800, "field_edits": 1000, "mutated": 1000}
COMPILE_CASES = 150
COMPILE_LIMIT_S = 5.0  # CPU seconds for a whole compile, codegen included


def front_end(source: str, file: str = FILE) -> None:
    """What `nlc.compile` does before codegen: parse, check, level graph, derive, plan."""
    checked, _ = check(source, file)
    level_graph = graph.build(checked)
    graph.verify(level_graph)
    chunk = int(checked.params.get("chunk", 64))
    for rules in derive(checked).values():
        plan(rules, chunk)


@contextmanager
def hang_guard(seconds: int = HANG_S):
    def stuck(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_located(exc: SpecError, source: str, file: str = FILE) -> None:
    errors = [d for d in exc.diagnostics if d.severity == "error"]
    assert errors, "a SpecError without an error diagnostic"
    lines = source.count("\n") + 1
    for d in errors:
        assert d.span is not None, f"an error without a location: {d.message}"
        assert d.span.file == file and 1 <= d.span.line <= lines and d.span.column >= 1, d.span
    first = errors[0].span
    assert f"{file}:{first.line}:{first.column}" in exc.render()


def diagnose(source: str, run=front_end, file: str = FILE, limit: float = LIMIT_S):
    """Run `run(source)`; return 'ok' or the SpecError, after checking the property. A run over the
    time limit runs again and the second time counts (a garbage collection or an evicted sympy
    cache can stall one run; a slow spec is slow twice)."""
    for attempt in (1, 2):
        started = time.process_time()
        outcome = "ok"
        with hang_guard():
            try:
                run(source)
            except SpecError as exc:
                assert_located(exc, source, file)
                outcome = exc
        spent = time.process_time() - started
        if spent < limit:
            return outcome
    raise AssertionError(f"{spent:.2f} s of CPU to diagnose this spec (twice over {limit} s)")


@pytest.fixture(scope="module")
def scale(request):
    for text in SHIPPED.values():  # warm sympy's caches: a first derivation costs a second alone
        front_end(text)
    return 10 if request.config.getoption("--fuzz-long") else 1


def fuzz(strategy, cases: int, name: str, run=front_end, file: str = FILE, limit: float = LIMIT_S,
         explore: bool = False):
    """Run `cases` drawn from `strategy` through `run`; the same draws every time unless `explore`."""
    @settings(max_examples=cases, deadline=None, database=None, print_blob=True, derandomize=not explore,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def case(source):
        ran[0] += 1
        diagnose(source, run, file, limit)
    ran = [0]
    case()
    assert ran[0] >= cases, f"hypothesis ran {ran[0]} of the {cases} {name} cases"


def test_fuzz_declarations(scale):
    """Specs built from the grammar's productions and the option table."""
    fuzz(declarations(), FUZZ_CASES["declarations"] * scale, "declarations", explore=scale > 1)


def test_fuzz_field_edits(scale):
    """Shipped specs with a level field, a parameter or a stream changed."""
    fuzz(field_edits(), FUZZ_CASES["field_edits"] * scale, "field_edits", explore=scale > 1)


def test_fuzz_mutated(scale):
    """Shipped, generated and edited specs with tokens deleted, duplicated, swapped, replaced, or
    odd text inserted (unicode, bytes, huge numbers, deep nesting, long names)."""
    seeds = shipped_specs | declarations() | field_edits()
    fuzz(mutated(seeds), FUZZ_CASES["mutated"] * scale, "mutated", explore=scale > 1)


def compile_and_parse(source: str) -> None:
    program = nlc.compile(source)
    for name, text in program.sources.items():
        pyast.parse(text, filename=name)


def test_fuzz_compile_sample(scale):
    """A sample through the whole compiler, codegen included: a Program whose generated sources
    parse, or a SpecError (codegen is held to COMPILE_LIMIT_S, not to the one-second budget)."""
    fuzz((field_edits() | declarations()).filter(lambda text: "\n" in text),
         COMPILE_CASES * scale, "compile", compile_and_parse, "<spec>", COMPILE_LIMIT_S, explore=scale > 1)


def test_fuzz_case_count():
    """The default run covers at least 2,000 front-end cases: each fuzz test above checks that it
    ran all of its cases, in whichever pytest-xdist worker it runs (this test used to count them
    across the session, and skipped when they ran elsewhere)."""
    assert sum(FUZZ_CASES.values()) >= 2000, FUZZ_CASES


# ---- edge cases ----------------------------------------------------------------------------------
BASE = SHIPPED["gated_deltanet.nl"]
CODE_LINE = "param p = 1 + 2 * 3\n"

EDGES = [  # (case, spec text, 'ok' or a substring of the first error)
    ("empty", "", "declares no model"),
    ("blank", " \n\t\n", "declares no model"),
    ("comments_only", "# nothing\n" * 5, "declares no model"),
    ("nul_bytes", "\0" * 100, "unexpected character '\\x00'"),
    ("byte_order_mark", "\ufeff" + BASE, "unexpected character '\\ufeff'"),
    ("crlf_line_ends", BASE.replace("\n", "\r\n"), "ok"),
    ("form_feeds", BASE.replace("\n", "\n\x0c"), "ok"),
    ("lone_surrogate", BASE + "\ud800", "unexpected character"),
    ("accented_name", BASE.replace("level memory", "level mémoire"), "unexpected character 'é'"),
    ("one_megabyte_of_comments", BASE + ("# " + "c" * 98 + "\n") * 10_500, "ok"),
    ("one_megabyte_of_declarations", BASE + CODE_LINE * (1_000_000 // len(CODE_LINE)),
     f"more than {MAX_CODE} characters of declarations"),
    ("one_megabyte_name", "model " + "n" * 1_000_000 + "\n", "characters of declarations"),
    ("deep_parentheses", BASE.replace("output = ", "output = " + "(" * 5000, 1) + ")" * 5000, "ok"),
    ("deep_calls", BASE.replace("output = ", "output = " + "silu(" * 5000, 1) + ")" * 5000,
     f"more than {MAX_DEPTH} calls"),
    ("deep_negation", "model m\nparam d_model = " + "-" * 5000 + "1\n", f"more than {MAX_DEPTH}"),
    ("long_sum", "model m\nparam d_model = " + " + ".join(["1"] * 5000) + "\n", f"more than {MAX_DEPTH}"),
    ("power_tower", "model m\nparam d_model = " + " ** ".join(["9"] * 50) + "\n", "cannot evaluate"),
    ("four_hundred_digits", "model m\nparam d_model = " + "9" * 400 + "\n", "finite number"),
    ("long_level_name", "long_level_name", "a name of 5000 characters"),  # built from LEVEL below
]


@pytest.mark.parametrize("case,text,expected", EDGES, ids=[c for c, *_ in EDGES])
def test_edge_case(case, text, expected):
    if case == "long_level_name":
        name = "m" * 5000
        text = level().replace("level mem", f"level {name}").replace("(mem)", f"({name})")
    outcome = diagnose(text)
    if expected == "ok":
        assert outcome == "ok", str(outcome)[:2000]
    else:
        assert outcome != "ok" and expected in outcome.diagnostics[0].message, str(outcome)[:2000]


# ---- bugs found (each crashed, hung or took minutes before its fix) ------------------------------
LEVEL = """model m
param d_model = 16
param heads = 2
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
let q[heads, 8] = l2norm(linear(x))
let k[heads, 8] = l2norm(linear(x))
let v[heads, 8] = linear(x)
level mem {{
  memory {memory}
  bias l2
  retention {retention}
  algorithm gd(lr = {lr})
  init learned
}}
output = linear(mem)
"""


def level(memory="matrix", retention="decay(alpha)", lr="beta", lets=""):
    return LEVEL.format(memory=memory, retention=retention, lr=lr).replace("level mem", lets + "level mem")


REGRESSIONS = [  # (case, spec, substring of the first error, line)
    # sympy.solve found no solution for a strength of 0 (ValueError from derive)
    ("kl_global_zero", level(retention="kl(global = 0)"), "kl(global) is a strength", 12),
    ("l2_global_zero", level(retention="l2(global = 0)"), "l2(global) is a strength", 12),
    ("elastic_zero", level(retention="elastic(l1 = 0, l2 = 1)"), "elastic(l1) is a strength", 12),
    # a level keyed on a stream of shape [] (IndexError in the checker)
    ("scalar_key", level(lets="let kk = 4\n").replace("  init learned", "  key kk"),
     "the key of level 'mem' is 'kk', of shape []", 15),
    # poly() feature count computed term by term for a huge degree (hang)
    ("poly_huge_degree", level(lets="let p = poly(q, 1000000)\n").replace("  init learned",
                                                                           "  key p  query p"),
     "has more than", 9),
    # 1e308 * 1e308 computed every operator, 1e308 ** 1e308 included (hang)
    ("eager_power", level(retention="decay(1e308 * 1e308)"), "no finite real value", 12),
    # exp(1e308) reached the planner's sympy.factor (hang)
    ("huge_exponential", level(lr="exp(1e308) * beta"), "no finite real value", 13),
    ("log_of_zero", level(lr="log(0) * beta"), "no finite real value", 13),
    # codegen unrolled a billion MLP layers (hang)
    ("mlp_depth_billion", level(memory="mlp(depth = 1000000000)", retention="none"),
     "deeper than nlc unrolls", 10),
]


@pytest.mark.parametrize("case,text,message,line", REGRESSIONS, ids=[c for c, *_ in REGRESSIONS])
def test_regression(case, text, message, line):
    outcome = diagnose(text)
    assert outcome != "ok", f"{case}: checked without an error"
    first = next(d for d in outcome.diagnostics if d.severity == "error")
    assert message in first.message and first.span.line == line, outcome.render()


def test_regression_constant_product_in_codegen():
    """`kernel = 1000 * 1000` once made the layer generator compute 1000.0 ** 1000.0 (OverflowError)."""
    text = level().replace("let q[heads, 8] = l2norm(linear(x))",
                           "let q[heads, 8] = l2norm(conv(linear(x), kernel = 1000 * 1000))")
    program = nlc.compile(text)
    assert "blocks.CausalConv(16, 1000000)" in program.sources["layer.py"]


def test_regression_render_counts_lines_like_the_parser():
    """A lone carriage return is blank space to the parser but a line break to str.splitlines: the
    rendered diagnostic once quoted the wrong line."""
    text = "model m\rparam d_model = 16\nparam heads = $\n"
    with pytest.raises(SpecError) as exc:
        check(text, FILE)
    assert f"{FILE}:2:15" in exc.value.render() and "2 | param heads = $" in exc.value.render()


def test_regression_chunk_parameter_is_a_positive_integer():
    """`param chunk = 0.5` passed the checker and crashed the decay family's generator (the plans'
    chunk size was int(0.5) = 0); found by test_fuzz_compile_sample."""
    text = level().replace("param heads = 2", "param heads = 2\nparam chunk = 0.5")
    outcome = diagnose(text, nlc.compile, "<spec>")
    assert outcome != "ok" and "'chunk' must be an integer >= 1, got 0.5" in outcome.render()
    with pytest.raises(SpecError, match="'chunk' must be an integer >= 1, got 0"):
        nlc.compile(text.replace("chunk = 0.5", "chunk = 16"), chunk=0)
