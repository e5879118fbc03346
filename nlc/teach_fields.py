"""`value teach`: a level driven by the language model's own error signal (MATH.md §4.2, "Which loss
drives CMS in context?", the teach-signal reading). A mixin of the level-field checker
(`nlc.level_fields.LevelFields`): recognise the form and reject what it gives no meaning to.

The level's output y_t = M(q_t) is read at the state committed at its last period boundary; at each
boundary its state moves by its own rule with the gradient of <M(q_t), δ_t> over the block that just
finished, δ_t = ∂L/∂y_t the gradient of the model's next-token loss (`nlc.runtime.teach`). That is the
rule of a `bias dot` level whose key is its query and whose value is -δ_t."""
from __future__ import annotations

from . import ast, ir
from .diagnostics import nearest

TEACH = "teach"
# the implied bias: ℓ_t = -<M(k_t), v_t> with k = q and v = -δ, so dℓ/dy = δ
TEACH_BIAS = ir.Choice("dot", {}, None)


class TeachFields:
    def _teach_signal(self, fields: dict[str, ast.Field]) -> bool | None:
        """None if the level's value is not the teach signal; else whether δ is a constant for the
        outer loop (`value teach`, `teach(stopgrad = 1)`) or differentiated (`teach(stopgrad = 0)`)."""
        v = fields["value"].value if "value" in fields else None
        if isinstance(v, ast.Name) and v.id == TEACH:
            if TEACH in self.streams:
                self._fail(f"'{TEACH}' names a stream here, and `value {TEACH}` the teach signal", v.span,
                           "another name for the stream")
            return True
        if not isinstance(v, ast.Call) or v.func != TEACH:
            return None
        if v.args:
            self._fail("teach takes no stream: its target is the model's loss gradient", v.args[0].span,
                       "value teach or value teach(stopgrad = <flag>)")
        for key, value in v.kwargs:
            if key != "stopgrad":
                self._fail(f"teach() has no argument '{key}'", value.span, "stopgrad",
                           nearest(key, ["stopgrad"]))
        flag = v.kwarg("stopgrad")
        return flag is None or self._number(flag) != 0

    def _check_teach(self, d: ast.LevelDecl, fields: dict[str, ast.Field], level: ir.Level) -> None:
        """What a teach level must be: read before its write, updated in context at a period, its
        gradients at the state its reads used, key = query, its state the weights it reads with."""
        def where(key):
            return fields[key].value.span if key in fields else d.span
        if "bias" in fields:
            self._fail(f"level '{d.name}' learns from the teach signal, which is its bias", where("bias"),
                       "no `bias` line in a teach level", "its loss is <y_t, δ_t>, δ_t = dL/dy_t")
        if level.key != level.query:
            self._fail(f"the key of teach level '{d.name}' is '{level.key}' but its query is "
                       f"'{level.query}'", where("key"), f"key {level.query} (or no key line)",
                       "δ_t is the gradient at the output M(q_t), so the step is taken at q_t")
        if level.period is None:
            self._fail(f"teach level '{d.name}' updates only in the outer loop", where("update"),
                       "update every <C>")
        if level.read != "before":
            self._fail(f"teach level '{d.name}' reads after writing", where("read"), "read before",
                       "the write needs δ of the block's reads, so every read comes first")
        if level.grad_chunk != level.period:
            self._fail(f"teach level '{d.name}' updates every {level.period} but takes gradients "
                       f"{'at chunk_start(%d)' % level.grad_chunk if level.grad_chunk else 'at ' + level.grad_at}",
                       where("gradient"), f"gradient chunk_start({level.period}) (or no gradient line)",
                       "δ is computed at the state the block read, so its gradients are taken there")
        if level.accumulates:
            self._fail(f"teach level '{d.name}' keeps an FTRL accumulator as its state", d.span,
                       "a retention and algorithm whose state is the weights (no lq, no ftrl)")
        if level.init_from is not None:
            self._fail(f"teach level '{d.name}' restarts from another level's state", where("init"),
                       "init learned or init zero")
