"""Input errors: the one exception type that ends a run with one clear line and exit code 2."""

from __future__ import annotations


class InputError(Exception):
    """A user mistake in a scenario, trace, preset or command-line value.

    ``source`` names the file (or ``--set``, or a preset), ``field`` the dotted field path,
    ``message`` says what was wrong and what was expected. ``str()`` gives the one line the CLI
    prints.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        self.message = message
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line description: ``source: field: message``."""
        parts = [p for p in (self.source, self.field) if p]
        return ": ".join(parts + [self.message])

    def with_context(self, *, source: str | None = None, field: str | None = None) -> "InputError":
        """A copy that fills in ``source``/``field`` where this error has none."""
        return InputError(self.message, source=self.source or source, field=self.field or field)


def pydantic_error_line(exc, source: str | None = None, prefix: str = "") -> InputError:
    """Turn a pydantic ``ValidationError`` into an :class:`InputError` naming the first bad field."""
    errs = exc.errors(include_url=False)
    if not errs:  # pragma: no cover - pydantic always reports at least one
        return InputError(str(exc), source=source)
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ()) if not _is_union_tag(p)]
    field = ".".join(([prefix] if prefix else []) + loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key (misspelt?)"
    elif "input" in first and first.get("type") not in ("missing",):
        inp = first["input"]
        shown = repr(inp)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        if not isinstance(inp, dict):
            msg = f"{msg} (got {shown})"
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return InputError(msg + more, source=source, field=field)


def _is_union_tag(p) -> bool:
    # pydantic puts discriminator tags / function names into loc for unions; drop noise like
    # 'function-after[...]' but keep real keys.
    return isinstance(p, str) and ("[" in p and "]" in p)
