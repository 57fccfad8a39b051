"""Statements of the hot paths compiled once per dialect, and run on the driver with tuples.

A lease with its report, and the writing of a job's batches, are a few statements run many
times, or over many rows at once. Through `conn.execute`, SQLAlchemy builds and coerces the
statement on every call, looks its compiled form up by a cache key, and turns every row of an
executemany into a dict of processed parameters. Measured in process (`bench/store.py`, SQLite):
2,000 batches leased 256 at a time and reported cost 85-95 ms of the store's time, of which the
driver's own execute, executemany and commit were 36 ms; statement building and coercion were
about 15 ms, and per-row parameter processing (`construct_params`, 8,000 calls) about 18 ms.
Writing 10,000 batches spent 40 ms building dict rows and processing them around 70 ms of
executemany, where sqlite3's own executemany of the same rows takes 50 ms.

`Prepared` keeps the statement as SQLAlchemy Core builds it from `tables` (so its SQL cannot
drift from the schema), compiles it once per dialect in the driver's positional paramstyle
(SQLite's `?`; psycopg gets `%s`), and runs it with `exec_driver_sql` and plain tuples: the
driver gets the rows as they are, and the connection's transaction, error wrapping and events
are SQLAlchemy's as before. Constant values in the statement (`state = 'queued'`) are written
into its SQL, so a row holds only what varies. One parameter may be `expanding` (`IN`): its SQL
is made once per list length.

The values reach the driver unprocessed: only types the driver takes as they are (str, int,
float, bytes, None) may go through here, and the rows that come back are the driver's
(`row.name` works; a Boolean column reads as 0 or 1 on SQLite).
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, CursorResult, Dialect
from sqlalchemy.sql import visitors
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import ExternallyTraversible

Arrange = Callable[[Sequence[Any]], tuple[Any, ...]]


class Prepared:
    """A statement whose parameters (`sa.bindparam`) are given as tuples in `names`' order.

    `run(conn, *values)` executes it once (an expanding parameter's value is a list);
    `run_many(conn, rows)` is an executemany of tuples.
    """

    def __init__(self, statement: sa.ClauseElement, *names: str) -> None:
        self.names = names
        self._statement = _constants_inline(statement)
        # (dialect name, list length) -> the SQL and how a row of values becomes its tuple
        # (None: the values are in the SQL's order already).
        self._compiled: dict[tuple[str, int], tuple[str, Arrange | None]] = {}
        self._lock = threading.Lock()

    def run(self, conn: Connection, *values: Any) -> CursorResult[Any]:
        expanded = next((len(v) for v in values if isinstance(v, list | tuple)), 0)
        sql, arrange = self._sql(conn.dialect, expanded)
        return conn.exec_driver_sql(sql, values if arrange is None else arrange(values))

    def run_many(self, conn: Connection, rows: list[tuple[Any, ...]]) -> CursorResult[Any]:
        sql, arrange = self._sql(conn.dialect, 0)
        return conn.exec_driver_sql(sql, rows if arrange is None else [arrange(r) for r in rows])

    def _sql(self, dialect: Dialect, expanded: int) -> tuple[str, Arrange | None]:
        key = (dialect.name, expanded)
        found = self._compiled.get(key)
        if found is None:
            with self._lock:
                found = self._compiled[key] = self._compile(dialect, expanded)
        return found

    def _compile(self, dialect: Dialect, expanded: int) -> tuple[str, Arrange | None]:
        compiled = self._statement.compile(dialect=_positional(dialect))
        assert isinstance(compiled, SQLCompiler)
        # Expanding an IN list of `expanded` placeholders (and writing the constants in):
        # the values are stand-ins, only the SQL and the order of its placeholders are kept.
        stand_ins: dict[str, Any] = {}
        for name in self.names:
            bind = compiled.binds[name]
            stand_ins[name] = list(range(expanded)) if bind.expanding else None
        state = compiled.construct_expanded_state(stand_ins)
        assert state.positiontup is not None
        order = tuple(state.positiontup)
        if order == self.names:
            return state.statement, None
        *fixed, last = self.names
        if order == (*fixed, *state.parameter_expansion.get(last, ())):
            return state.statement, _splat  # the list last, as the SQL has it
        places = tuple(
            _place(self.names, state.parameter_expansion, name, state.parameters)
            for name in state.positiontup
        )
        return state.statement, functools.partial(_arrange, places)


def _splat(values: Sequence[Any]) -> tuple[Any, ...]:
    return (*values[:-1], *values[-1])


def _arrange(
    places: tuple[Callable[[Sequence[Any]], Any], ...], values: Sequence[Any]
) -> tuple[Any, ...]:
    return tuple(place(values) for place in places)


def _place(
    names: tuple[str, ...],
    expansion: Mapping[str, list[str]],
    name: str,
    parameters: Mapping[str, Any],
) -> Callable[[Sequence[Any]], Any]:
    """Where the value of the SQL's placeholder `name` comes from in a row of values."""
    if name in names:
        return operator.itemgetter(names.index(name))
    for expanding, elements in expansion.items():
        if name in elements:
            index, element = names.index(expanding), elements.index(name)
            return lambda values: values[index][element]
    constant = parameters[name]  # one the dialect adds itself (SQLite's `OFFSET 0`)
    return lambda _values: constant


@functools.cache
def _positional(dialect: Dialect) -> Dialect:
    """The dialect itself if its paramstyle is positional (sqlite3's `?`), else the same
    dialect with `%s` placeholders (psycopg takes both; SQLAlchemy's default for it is
    `%(name)s`, which psycopg maps to positions again for every row)."""
    if dialect.positional:
        return dialect
    positional: Dialect = type(dialect)(paramstyle="format")  # type: ignore[call-arg]
    return positional


def _constants_inline(statement: sa.ClauseElement) -> sa.ClauseElement:
    """The statement with every value it carries (not a `bindparam` left to the caller)
    rendered as a literal in its SQL."""

    def literal(element: Any, **_kw: Any) -> Any:
        if isinstance(element, BindParameter) and not element.required:
            inline = element._clone()
            inline.literal_execute = True
            return inline
        return None

    inlined = visitors.replacement_traverse(cast(ExternallyTraversible, statement), {}, literal)
    return cast(sa.ClauseElement, inlined)
