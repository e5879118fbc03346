"""Stream functions that make a whole block: softmax attention, rotary positions, the SwiGLU MLP,
a read of a level's state at segment starts (`recall`, Titans MAC) and stop-gradient. Their shape
rules, as a mixin of the checker (`nlc.lower`): it uses the checker's shapes, numbers and
diagnostics. Meanings: grammar/README.md §3.1; the segment loop `recall` implies: `nlc.segments`."""
from __future__ import annotations

from . import ast

BLOCK_FUNCS = {"attention", "rope", "swiglu", "recall", "stopgrad"}
KWARGS = {"attention": {"window", "block", "persistent", "extra_k", "extra_v"},
          "rope": {"base"}, "swiglu": {"hidden"}, "recall": {"segment"}, "stopgrad": set()}
ARITY = {"attention": 3, "rope": 1, "swiglu": 1, "recall": 2, "stopgrad": 2}


class BlockShapes:
    def _block_shape(self, e: ast.Call, want, in_gate) -> tuple[int, ...]:
        f = e.func
        if in_gate and f != "stopgrad":
            self._fail(f"{f}() in a gate", e.span, "gates of the current token only")
        for k, v in e.kwargs:
            if k not in KWARGS[f]:
                self._fail(f"{f}() takes no argument '{k}'", v.span,
                           ", ".join(sorted(KWARGS[f])) or "no keyword arguments")
        if not e.args or len(e.args) > ARITY[f] or (f in ("attention", "recall")
                                                    and len(e.args) != ARITY[f]):
            usage = {"attention": "attention(q, k, v[, window = W, block = S, persistent = P])",
                     "rope": "rope(<stream>)", "swiglu": "swiglu(<stream>[, hidden = N])",
                     "recall": "recall(<level>, <query>, segment = S)",
                     "stopgrad": "stopgrad(<stream>[, on])"}[f]
            self._fail(f"{f}() takes {ARITY[f]} input(s) here", e.span, usage)
        return getattr(self, f"_{f}_shape")(e, want, in_gate)

    def _attention_shape(self, e, want, in_gate):
        q, k, v = (self._shape(a, None, in_gate) for a in e.args)
        if len(q) != 2 or q != k or len(v) != 2 or v[0] != q[0]:
            self._fail(f"attention() needs per-head q, k of one shape and v with their heads, got "
                       f"{list(q)}, {list(k)}, {list(v)}", e.span,
                       "q, k [heads, d_key] and v [heads, d_value]")
        for name in ("window", "block", "persistent"):
            if e.kwarg(name) is not None:
                self._int(e.kwarg(name), f"attention({name})", minimum=0)
        for name, like in (("extra_k", k), ("extra_v", v)):
            extra = e.kwarg(name)
            if (extra is None) != (e.kwarg("extra_v" if name == "extra_k" else "extra_k") is None):
                self._fail("extra_k and extra_v come together", e.span, "both or neither")
            if extra is not None and self._shape(extra, like, in_gate) != like:
                self._fail(f"attention({name}) must have shape {list(like)}", extra.span,
                           f"shape {list(like)}")
        return v

    def _rope_shape(self, e, want, in_gate):
        inner = self._shape(e.args[0], want, in_gate)
        if not inner or inner[-1] % 2:
            self._fail(f"rope() rotates channel pairs; got shape {list(inner)}", e.span,
                       "a stream whose last axis is even")
        if e.kwarg("base") is not None and self._number(e.kwarg("base")) <= 1:
            self._fail("rope(base) must exceed 1", e.kwarg("base").span, "e.g. 10000")
        return inner

    def _swiglu_shape(self, e, want, in_gate):
        inner = self._shape(e.args[0], want, in_gate)
        if len(inner) != 1:
            self._fail(f"swiglu() maps one vector per token, got shape {list(inner)}", e.span,
                       "a [d] stream (flatten heads with linear first)")
        if e.kwarg("hidden") is not None:
            self._int(e.kwarg("hidden"), "swiglu(hidden)")
        return inner

    def _recall_shape(self, e, want, in_gate):
        level = e.args[0]
        if not isinstance(level, ast.Name):
            self._fail("recall() reads a level", level.span, "recall(<level name>, <query>)")
        if e.kwarg("segment") is None:
            self._fail("recall() needs its segment length", e.span, "recall(level, q, segment = S)")
        self._int(e.kwarg("segment"), "recall(segment)")
        query = self._shape(e.args[1], None, in_gate)
        if want is None:
            self._fail("recall() needs a declared shape", e.span,
                       "let name[heads, d_value] = recall(...) (the level's read-out shape)")
        self.recalls.append((e, query, want))  # checked against the level once levels are known
        return want

    def _stopgrad_shape(self, e, want, in_gate):
        if len(e.args) == 2:
            self._int(e.args[1], "stopgrad's flag", minimum=0)
        return self._shape(e.args[0], want, in_gate)

    def _check_recalls(self) -> None:
        """Each recall names a level with a plain state, with a query and read-out of its shapes."""
        levels = {lv.name: lv for lv in self.levels}
        for e, query, shape in self.recalls:
            name = e.args[0]
            if name.id in self.failed:
                continue  # already reported
            if name.id not in levels:
                self.diag.error(f"recall() of '{name.id}', which is no level", name.span,
                                "a level name", f"levels: {', '.join(levels) or 'none'}")
                continue
            lv = levels[name.id]
            key, out = self.streams[lv.key].shape, self.streams[lv.name].shape
            if lv.accumulates:
                self.diag.error(f"recall() of level '{lv.name}', whose state is an accumulator",
                                e.span, "a level without lq retention or ftrl")
            if query != key:
                self.diag.error(f"recall() query {list(query)} differs from level '{lv.name}' keys "
                                f"{list(key)}", e.args[1].span, f"shape {list(key)}")
            if shape != out:
                self.diag.error(f"recall() of '{lv.name}' has shape {list(out)}, declared "
                                f"{list(shape)}", e.span, f"shape {list(out)}")
