"""The bad-spec table: each broken spec raises SpecError (nothing else) whose first error points at
the right line and column, quotes the source line with a caret, and says what was expected."""
import pytest

from nlc.diagnostics import SpecError
from nlc.lower import check

BASE = """\
model m
param d_model = 16
param heads = 2
let q[heads, 8] = l2norm(linear(x))
let k[heads, 8] = l2norm(linear(x))
let v[heads, 8] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
level mem {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
}
output = linear(mem)
"""


def sub(**lines) -> str:
    """BASE with lines replaced: sub(l4="...") replaces line 4; an empty string drops it."""
    out = BASE.splitlines()
    for key, text in lines.items():
        out[int(key[1:]) - 1] = text
    return "\n".join(line for line in out if line != "") + "\n"


def add(*lines) -> str:
    return BASE + "\n".join(lines) + "\n"


TWO_LEVELS = sub(l9="level a { memory matrix  bias l2  algorithm gd(lr = 0.5)  key b }",
                 l10="level b { memory matrix  bias l2  algorithm gd(lr = 0.5)  key a }",
                 l11="", l12="", l13="", l14="", l15="output = linear(a + b)")

# (name, spec text, overrides, expected substrings, line, column, hint substring or None).
# line None: the problem has no place in the spec (no model, a --set value).
TABLE = [
    # ---- syntax -------------------------------------------------------------------------------
    ("missing_equals", sub(l2="param d_model 16"), {}, ["unexpected '16'", "'='"], 2, 15, None),
    ("unclosed_brace_at_eof", sub(l14="", l15=""), {}, ["unexpected end of file", "'}'"], 13, 26,
     None),
    ("unclosed_paren", sub(l4="let q[heads, 8] = l2norm(linear(x)"), {},
     ["unexpected 'let'", "')'"], 5, 1, None),
    ("extra_close_paren", sub(l15="output = linear(mem))"), {}, ["unexpected ')'"], 15, 21, None),
    ("stray_character", sub(l7="gate alpha[heads] = sigmoid(linear(x)) $"), {},
     ["unexpected character '$'"], 7, 40, None),
    ("unexpected_eof", "model m\nparam d_model =\n", {}, ["unexpected end of file", "a number"],
     2, 16, None),
    ("misspelt_keyword", sub(l9="levle mem {"), {}, ["unexpected 'levle'", "'level'"], 9, 1,
     "a spec is a list of declarations"),
    ("quote_in_name", sub(l4='let "q"[heads, 8] = l2norm(linear(x))'), {},
     ["unexpected character '\"'"], 4, 5, None),
    # ---- unknown names ------------------------------------------------------------------------
    ("unknown_stream", sub(l11="  bias l2  key kk"), {}, ["unknown name 'kk'", "key"], 11, 16,
     "did you mean 'k'?"),
    ("unknown_gate", sub(l13="  algorithm gd(lr = bta)"), {}, ["unknown name 'bta'"], 13, 21,
     "did you mean 'beta'?"),
    ("unknown_parameter", sub(l4="let q[haeds, 8] = l2norm(linear(x))"), {},
     ["unknown name 'haeds'"], 4, 7, "did you mean 'heads'?"),
    ("unknown_function", sub(l4="let q[heads, 8] = l2nrom(linear(x))"), {},
     ["unknown name 'l2nrom'", "a stream function"], 4, 19, "did you mean 'l2norm'?"),
    ("unknown_name_in_output", sub(l15="output = linear(mme)"), {}, ["unknown name 'mme'"], 15, 17,
     "did you mean 'mem'?"),
    ("unknown_memory", sub(l10="  memory matrx"), {}, ["unknown memory 'matrx'"], 10, 10,
     "did you mean 'matrix'?"),
    ("unknown_bias", sub(l11="  bias hubr(delta = 1)"), {}, ["unknown bias 'hubr'"], 11, 8,
     "did you mean 'huber'?"),
    ("unknown_retention", sub(l12="  retention decya(alpha)"), {}, ["unknown retention 'decya'"],
     12, 13, "did you mean 'decay'?"),
    ("unknown_algorithm", sub(l13="  algorithm momentm(lr = beta, beta = 0.9)"), {},
     ["unknown algorithm 'momentm'"], 13, 13, "did you mean 'momentum'?"),
    ("unknown_field", sub(l12="  retension decay(alpha)"), {}, ["unknown level field 'retension'"],
     12, 3, "did you mean 'retention'?"),
    ("unknown_granularity", sub(l7="gate alpha[heads] per tokn = sigmoid(linear(x))"), {},
     ["unknown gate granularity 'tokn'"], 7, 19, "did you mean 'token'?"),
    ("gate_named_like_an_op_keyword", sub(l8="gate mode[heads] = sigmoid(linear(x))",
                                          l13="  algorithm gd(lr = mode)"), {},
     ["a gate named 'mode', which a level's op takes as a keyword", "other than q, k, v, mode"], 8, 1, None),
    # ---- missing and duplicate declarations ---------------------------------------------------
    ("missing_model", sub(l1=""), {}, ["no model"], 1, 1, None),
    ("missing_d_model", sub(l2=""), {}, ["no parameter 'd_model'"], 1, 1, "d_model and heads"),
    ("missing_heads", sub(l3=""), {}, ["no parameter 'heads'"], 1, 1, "d_model and heads"),
    ("missing_output", sub(l15=""), {}, ["no output"], 1, 1, None),
    ("missing_algorithm", sub(l13=""), {}, ["level 'mem' has no 'algorithm'"], 9, 1, None),
    ("duplicate_let", sub(l5="let q[heads, 8] = l2norm(linear(x))"), {},
     ["'q' is declared twice"], 5, 1, "first declared at t.nl:4:1"),
    ("duplicate_model", sub(l2="model n\nparam d_model = 16"), {}, ["second model"], 2, 1, None),
    ("duplicate_field", sub(l11="  bias l2  bias dot"), {}, ["'bias' given twice"], 11, 12, None),
    ("builtin_redeclared", sub(l4="let x[heads, 8] = l2norm(linear(x))"), {},
     ["'x' is a built-in name"], 4, 1, None),
    # ---- arguments ----------------------------------------------------------------------------
    ("bad_argument_name", sub(l11="  bias huber(delta = 1, fom = norm)"), {},
     ["huber() has no argument 'fom'"], 11, 31, "did you mean 'form'?"),
    ("bad_argument_value", sub(l11="  bias huber(delta = 1, form = nrom)"), {},
     ["bad value for huber(form)", "coord or norm or mixture"], 11, 32, "did you mean 'norm'?"),
    ("too_many_arguments", sub(l12="  retention decay(alpha, 2)"), {},
     ["decay() takes at most 1 arguments"], 12, 26, None),
    ("missing_required_argument", sub(l11="  bias lp"), {}, ["lp() needs 'p'", "lp(p, eps=...)"],
     11, 8, None),
    ("flag_argument", sub(l10="  memory mlp(gated = maybe)"), {}, ["mlp(gated) is a flag"],
     10, 22, None),
    ("omega_without_of", sub(l11="  bias omega(window = 2)"), {}, ["omega needs an inner bias"],
     11, 8, None),
    # ---- numbers and shapes -------------------------------------------------------------------
    ("non_integer_dim", sub(l4="let q[heads, 8.5] = l2norm(linear(x))"), {},
     ["a dimension must be an integer >= 1, got 8.5"], 4, 14, None),
    ("non_integer_d_model", sub(l2="param d_model = 16.5"), {},
     ["'d_model' must be an integer >= 1, got 16.5"], 2, 1, None),
    ("division_by_zero", sub(l3="param heads = 2 / (1 - 1)"), {}, ["cannot evaluate '/'"], 3, 15,
     None),
    ("output_not_d_model", sub(l15="output = mem"), {}, ["the output has shape [2, 8]", "[16]"],
     15, 10, "linear(...)"),
    ("declared_vs_computed", sub(l6="let v[heads, 8] = linear(x, 12)"), {},
     ["'v' computes shape [12] but is declared [2, 8]"], 6, 19, None),
    ("unsized_linear", sub(l15="output = linear(linear(x))"), {},
     ["cannot tell the size of linear(...)"], 15, 17, None),
    ("gate_shape", sub(l7="gate alpha[3] = sigmoid(linear(x))"), {}, ["gate 'alpha' has shape [3]"],
     7, 1, None),
    # ---- graph --------------------------------------------------------------------------------
    ("cycle_between_levels", TWO_LEVELS, {}, ["cycle in the level graph: a -> b -> a"], 9, 1,
     "path: a (t.nl:9:1) -> b (t.nl:10:1) -> a (t.nl:9:1)"),
    ("level_keyed_on_itself", sub(l11="  bias l2  key mem"), {},
     ["cycle in the level graph: mem -> mem"], 9, 1, "path: mem (t.nl:9:1)"),
    ("cycle_between_gates", sub(l7="gate alpha[heads] = sigmoid(beta)",
                                l8="gate beta[heads] = 1 - alpha"), {},
     ["cycle between gates: alpha -> beta -> alpha"], 7, 1, "beta (t.nl:8:1)"),
    # ---- level field values -------------------------------------------------------------------
    ("bad_update", sub(l12="  update sometimes"), {}, ["bad update period", "every <C> or outer"],
     12, 10, None),
    ("zero_update_period", sub(l12="  update every 0"), {},
     ["an update period must be an integer >= 1, got 0"], 12, 16, None),
    ("bad_gradient", sub(l12="  gradient retaned"), {}, ["bad gradient point"], 12, 12,
     "did you mean 'retained'?"),
    ("bad_read", sub(l12="  read befor"), {}, ["bad value for 'read'", "after or before"], 12, 8,
     "did you mean 'before'?"),
    ("bad_init", sub(l12="  init lerned"), {}, ["bad value for 'init'", "zero or learned"], 12, 8,
     "did you mean 'learned'?"),
    # ---- validity rules (MATH.md 5.7) ---------------------------------------------------------
    ("implicit_with_lp", sub(l11="  bias lp(p = 3)", l12="  retention implicit"), {},
     ["implicit (proximal) step", "bias l2"], 12, 13, "decay or l2 retention"),
    ("lq_q_le_1", sub(l12="  retention lq(q = 1)"), {}, ["lq retention needs q > 1"], 12, 13, None),
    ("lq_q_1_at_chunks", sub(l12="  retention lq(q = 1, apply = chunk)",
                             l13="  algorithm gd(lr = beta)  gradient chunk_start(4)"), {},
     ["lq retention needs q > 1"], 12, 13, None),
    ("lq_q_0_at_chunks", sub(l12="  retention lq(q = 0, apply = chunk)",
                             l13="  algorithm gd(lr = beta)  gradient chunk_start(4)"), {},
     ["lq retention needs q > 1"], 12, 13, None),
    ("lp_p_le_0", sub(l11="  bias lp(p = 0)"), {}, ["lp needs p > 0, got 0"], 11, 8, None),
    ("lq_chunk_map_without_chunks", sub(l12="  retention lq(q = 4, map = miras, apply = chunk)"), {},
     ["lq(apply = chunk)", "gradient chunk_start(C)"], 12, 13, None),
    ("lq_chunk_map_exact", sub(l12="  retention lq(q = 4, apply = chunk)  init learned",
                               l13="  algorithm gd(lr = beta)  gradient chunk_start(4)"), {},
     ["slope N**(2/3)/Abs(A)**(2/3) depends on A itself", "map = miras"], 12, 13, None),
    ("lq_chunk_map_from_zero", sub(l12="  retention lq(q = 4, map = miras, apply = chunk)",
                                   l13="  algorithm gd(lr = beta)  gradient chunk_start(4)"), {},
     ["slope at its start, N**(-2), which is unbounded at the zero initial state", "init learned"],
     12, 13, None),
    ("kl_lag_token_without_chunks", sub(l12="  retention kl(decay = alpha, apply = chunk)  init learned"),
     {}, ["kl(apply = chunk)", "first token of each gradient chunk", "gradient chunk_start(C)"],
     12, 13, None),
    ("kl_lag_token_bad_apply", sub(l12="  retention kl(decay = alpha, apply = chunks)  init learned"),
     {}, ["apply", "token or chunk"], 12, 39, "did you mean 'chunk'?"),
    ("kl_with_init_zero", sub(l12="  retention kl(decay = alpha)"), {},
     ["KL retention", "zero state", "init learned"], 12, 13, None),
    ("kl_with_ftrl", sub(l12="  retention kl(decay = alpha)  init learned",
                         l13="  algorithm ftrl(lr = beta)"), {}, ["no FTRL accumulator"], 13, 13,
     None),
    ("muon_on_vector", sub(l10="  memory vector", l13="  algorithm muon(lr = beta, beta = 0.9)"),
     {}, ["Newton-Schulz (muon)", "memory matrix or mlp"], 13, 13, None),
    ("vector_gate_on_mlp_retention", sub(l7="gate alpha[heads, 8] = sigmoid(linear(x))",
                                         l10="  memory mlp"), {},
     ["gate 'alpha' is a vector gate", "gate alpha[heads]"], 12, 13, None),
    ("gradient_retained_with_kl", sub(l12="  retention kl(decay = alpha)  init learned  "
                                          "gradient retained"), {},
     ["`gradient retained`", "retention none or decay"], 12, 13, None),
    # ---- overrides and spaces -----------------------------------------------------------------
    ("unknown_override", BASE, {"d_modle": 32}, ["no parameter named 'd_modle' to override"],
     None, None, "did you mean 'd_model'?"),
    ("override_not_a_number", BASE, {"heads": "two"}, ["parameter 'heads' must be a finite number"],
     3, 1, None),
    ("space_over_unknown_level", add("space s over mme { bias in {l2, dot} }"), {},
     ["unknown name 'mme'", "a level of this spec"], 16, 1, "did you mean 'mem'?"),
    ("space_unknown_field", add("space s over mem { retension in {none} }"), {},
     ["unknown name 'retension'", "a level field"], 16, 20, "did you mean 'retention'?"),
    ("space_unknown_param", add("space s over mem { param head in {1, 2} }"), {},
     ["unknown name 'head'"], 16, 20, "did you mean 'heads'?"),
    ("space_without_valid_point",
     add("space s over mem {", "  bias in {lp(p = 3)}", "  retention in {implicit}", "}"), {},
     ["space 's' has no valid point"], 16, 1, "implicit (proximal) step"),
]


def test_table_is_big_enough():
    assert len(TABLE) >= 30
    assert len({row[0] for row in TABLE}) == len(TABLE)


def test_base_is_valid():
    check(BASE, "t.nl")


@pytest.mark.parametrize("name, text, overrides, needles, line, column, hint", TABLE,
                         ids=[row[0] for row in TABLE])
def test_bad_spec(name, text, overrides, needles, line, column, hint):
    with pytest.raises(SpecError) as exc:
        check(text, "t.nl", overrides)
    first = next(d for d in exc.value.diagnostics if d.severity == "error")
    rendered = first.render(text)
    for needle in needles:
        assert needle in rendered
    if line is None:
        assert first.span is None
    else:
        assert (first.span.line, first.span.column) == (line, column)
        assert f"t.nl:{line}:{column}" in rendered
        assert text.splitlines()[line - 1].expandtabs(1) in rendered
        caret = rendered.splitlines()[rendered.splitlines().index(
            f"{line} | {text.splitlines()[line - 1].expandtabs(1)}") + 1]
        assert caret.index("^") == caret.index("|") + 1 + column
    if hint is not None:
        assert first.hint is not None and hint in first.hint
    assert "Traceback" not in str(exc.value)
    assert str(exc.value) == exc.value.render()


@pytest.mark.parametrize("name", ["class", "import", "__import__", "print", "lambda"])
def test_python_words_as_spec_names_are_accepted(name):
    """Identifiers that are Python keywords or builtins pass the checker; codegen must sanitise."""
    text = BASE.replace("level mem", f"level {name}").replace("(mem)", f"({name})")
    checked, _ = check(text, "t.nl")
    assert checked.levels[0].name == name


def test_quotes_never_reach_a_name():
    for text in (BASE.replace("model m", 'model "m"'), BASE.replace("let v", "let v'"),
                 BASE.replace("mem {", 'mem"); import os; ("{')):
        with pytest.raises(SpecError):
            check(text, "t.nl")
