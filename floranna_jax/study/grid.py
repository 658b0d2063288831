"""A study's grids -> cells: named, validated experiment configs.

A study config (``configs/studies/*.py``) holds ``base`` (an experiment config, as
``configs/glue.py`` returns), ``variants`` and ``grids``. A grid is

    fixed = {section: {field: value}}         # set on every cell of the grid
    axes = (("method", ("fedit", "svd")),     # a labelled axis: values are labels of
            ("partition.alpha", (0.1, 0.5)),  #   variants.method, each a {section: {field:
            ("train.seed", (0, 1, 2)))        #   value}} override; any other axis is a field

and its cells are the product of its axes. A cell's name joins one label per axis, in the
order of the axes: a variant's label, or a field's last name and the value
(``fedit_alpha0.5_seed0``), so the name says everything that differs between cells and stays
the same when the grid grows. Cells are listed with the first axis varying fastest: a partly
run grid has every method at the first seed.

Every bad input is one ``ConfigError`` naming the grid, the cell and the field, raised
before anything is run: an unknown grid, variant or field (with the nearest valid name), a
value of the wrong type, and whatever ``config_check.validate`` rejects.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from floranna_jax import config_check
from floranna_jax.errors import ConfigError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._=+-]+$")  # a cell name is a folder name anywhere


class Cell(NamedTuple):
    """One run of a grid: ``name`` (its folder), ``grid``, ``values`` (axis -> the label or
    value this cell takes, in the grid's axis order) and ``config`` (the experiment, locked,
    validated unless expanded with ``validate=False``)."""

    name: str
    grid: str
    values: dict[str, Any]
    config: Any


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{section: {field: value}}`` -> ``{"section.field": value}`` (any depth)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            out |= flatten(value, path + ".")
        else:
            out[path] = value
    return out


def _grid(study, name: str):
    if name not in study.grids:
        raise ConfigError(
            f"--grid={name}: no such grid; the study's grids: {', '.join(study.grids) or 'none'}"
        )
    return study.grids[name]


def _label(axis: str, value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return f"{axis.rsplit('.', 1)[-1]}{text}"


def _axes(study, grid: str) -> list[tuple[str, list[tuple[str, Any, dict[str, Any]]]]]:
    """``[(axis, [(label, value, overrides), ...]), ...]`` of grid ``grid``."""
    spec = _grid(study, grid)
    out = []
    axes = spec.get("axes", ())
    pairs = isinstance(axes, tuple | list) and all(
        isinstance(a, tuple | list) and len(a) == 2 and isinstance(a[0], str) for a in axes
    )
    if not pairs:
        raise ConfigError(
            f"grid {grid}: axes must be (field or variant, values) pairs, got {axes!r}"
        )
    for axis, values in axes:
        if isinstance(values, str | bytes) or not hasattr(values, "__iter__") or not values:
            raise ConfigError(
                f"grid {grid}, axis {axis}: values must be a non-empty list, got {values!r}"
            )
        if axis in study.get("variants", {}):
            variants = study.variants[axis]
            points = []
            for label in values:
                if label not in variants:
                    raise ConfigError(
                        f"grid {grid}, axis {axis}: no variant {label!r}; "
                        f"variants.{axis}: {', '.join(variants)}"
                    )
                points.append((label, label, flatten(variants[label])))
        else:
            points = [(_label(axis, v), v, {axis: v}) for v in values]
        out.append((axis, points))
    return out


def _set(config, path: str, value: Any) -> None:
    """``config.<path> = value`` on a locked config, as one clear ConfigError."""
    *sections, name = path.split(".")
    try:
        node = config
        for section in sections:
            node = node[section]
        if isinstance(node[name], tuple) and isinstance(value, list):
            value = tuple(value)
        node[name] = value
    except (KeyError, AttributeError):
        config_check.check_overrides(config, [path])  # names the nearest field
        raise ConfigError(f"config field {path}: no such field") from None
    except TypeError:
        kind = type(node[name]).__name__
        raise ConfigError(
            f"config field {path}: {value!r} is a {type(value).__name__}, the field takes a {kind}"
        ) from None


def make_config(base, overrides: Mapping[str, Any], *, validate: bool = True):
    """A locked copy of ``base`` with ``{"section.field": value}`` set and (unless
    ``validate=False``: reading results, where the model and data may be absent) validated."""
    config = copy.deepcopy(base)
    config.lock()
    for path, value in overrides.items():
        _set(config, path, value)
    config_check.check_overrides(config, list(overrides))  # server.* the method does not take
    if validate:
        config_check.validate(config)
    return config


def expand(study, grid: str, *, validate: bool = True) -> list[Cell]:
    """The cells of ``grid``, first axis fastest, each validated (``config_check.validate``,
    which also checks that the model and data folders exist; ``validate=False`` skips it);
    raises ``ConfigError``."""
    axes = _axes(study, grid)
    fixed = flatten(_grid(study, grid).get("fixed", {}))
    cells, seen = [], set()
    for point in itertools.product(*[points for _, points in reversed(axes)]):
        point = point[::-1]  # back to the axes' order
        name = "_".join(label for label, _, _ in point)
        if not _SAFE_NAME.match(name) or name in seen:
            why = "repeats another cell's" if name in seen else "is not a portable folder name"
            raise ConfigError(f"grid {grid}: cell name {name!r} {why}; rename the labels")
        seen.add(name)
        overrides = dict(fixed)
        for _, _, more in point:
            overrides |= more
        try:
            config = make_config(study.base, overrides, validate=validate)
        except ConfigError as e:
            raise ConfigError(f"grid {grid}, cell {name}: {e}") from None
        values = {axis: value for (axis, _), (_, value, _) in zip(axes, point, strict=True)}
        cells.append(Cell(name, grid, values, config))
    return cells
