"""Command-line help from the typed configs: the docstring under each dataclass field becomes its
--help text (klong.Config and factory.FactoryConfig), so the documentation of a knob lives in one
place, beside the knob (docs/STYLE.md, practice 3)."""
from __future__ import annotations

import ast
import inspect


def field_docs(cls) -> dict[str, str]:
    """{field name: the string literal right under it, whitespace collapsed} for a dataclass."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}
