"""Expanding ``--grid`` and ``--zip`` items into lists of ``--set`` overrides.

``--grid a.b=1,2,4 --grid c=x,y`` is the cartesian product (the first key varies slowest);
``--zip k=a,b --zip m=c,d`` pairs its lists element by element (all --zip lists have one length)
and the pairs enter the product as one more factor, after the grid keys. Values are split at
top-level commas (commas inside ``[...]``, ``{...}`` or quotes stay) and parsed like ``--set``
values (YAML scalars or lists).
"""

from __future__ import annotations

import itertools
from typing import Any

from moesim.config.loader import parse_set
from moesim.errors import InputError


def split_values(raw: str) -> list[str]:
    """Split at commas that are not inside brackets, braces or quotes."""
    parts, cur, depth, quote = [], [], 0, None
    for ch in raw:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_item(item: str, option: str) -> tuple[str, list[str]]:
    """``key.path=v1,v2`` -> (key, [raw values]); each value is checked to parse like ``--set``."""
    if "=" not in item:
        raise InputError(f"expected key.path=value1,value2,..., got {item!r}", source=option)
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise InputError(f"bad key path {key!r} in {item!r}", source=option)
    values = split_values(raw)
    if any(v == "" for v in values):
        raise InputError(f"empty value in {raw!r} (expected comma-separated values)", source=option, field=key)
    for v in values:
        try:
            parse_set(f"{key}={v}")
        except InputError as e:
            raise InputError(e.message, source=option, field=key) from None
    return key, values


def swept_keys(grid: list[str], zip_: list[str]) -> list[str]:
    """The swept key paths in order: grid keys, then zip keys."""
    return [parse_item(g, "--grid")[0] for g in grid] + [parse_item(z, "--zip")[0] for z in zip_]


def expand(grid: list[str], zip_: list[str]) -> list[list[str]]:
    """All combinations as lists of ``key=value`` ``--set`` items (grid product x zipped pairs)."""
    g = [parse_item(x, "--grid") for x in grid]
    z = [parse_item(x, "--zip") for x in zip_]
    if not g and not z:
        raise InputError("nothing to sweep: give at least one --grid or --zip", source="moesim sweep")
    seen: set[str] = set()
    for key, _ in g + z:
        if key in seen:
            raise InputError("key swept twice", source="--grid/--zip", field=key)
        seen.add(key)
    if z:
        lengths = {len(v) for _, v in z}
        if len(lengths) > 1:
            desc = ", ".join(f"{k}: {len(v)}" for k, v in z)
            raise InputError(f"all --zip lists must have the same length ({desc})", source="--zip")
    factors: list[list[list[str]]] = [[[f"{k}={v}"] for v in vals] for k, vals in g]
    if z:
        n = len(z[0][1])
        factors.append([[f"{k}={vals[i]}" for k, vals in z] for i in range(n)])
    return [list(itertools.chain.from_iterable(combo)) for combo in itertools.product(*factors)]


def combo_values(combo: list[str]) -> dict[str, Any]:
    """The parsed values of one combination, by key path."""
    out = {}
    for item in combo:
        keys, value = parse_set(item)
        out[".".join(keys)] = value
    return out
