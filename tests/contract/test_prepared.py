"""Statements compiled once and run on the driver with tuples (`store.prepared`), on both
engines: values in any order of the SQL's placeholders, constants written into the SQL, an
expanding IN list of any length, executemany, and the rows that come back."""

from __future__ import annotations

import sqlalchemy as sa

from cortex.store import Store
from cortex.store import tables as t
from cortex.store.prepared import Prepared

_INSERT = Prepared(
    t.batches.insert().values(
        seq=sa.bindparam("s"),
        job_id=sa.bindparam("j"),
        batch_id=sa.bindparam("b"),
        state="queued",
        payload_size=sa.bindparam("n"),
    ),
    # Not the order of the SQL's placeholders (job_id, seq, batch_id, payload_size).
    "n",
    "b",
    "s",
    "j",
)
_TAKE = Prepared(
    t.batches.update()
    .where(
        t.batches.c.job_id == sa.bindparam("j"),
        t.batches.c.state == "queued",
        t.batches.c.seq.in_(sa.bindparam("seqs", expanding=True)),
    )
    .values(state="leased", lease_owner=sa.bindparam("w"), attempts=t.batches.c.attempts + 1),
    "w",
    "j",
    "seqs",
)
_FIRST = Prepared(
    sa.select(t.batches.c.seq, t.batches.c.state, t.batches.c.attempts, t.batches.c.lease_owner)
    .where(t.batches.c.job_id == sa.bindparam("j"))
    .order_by(t.batches.c.seq)
    .limit(sa.bindparam("n", type_=sa.Integer)),
    "j",
    "n",
)


def test_statements_run_with_tuples_on_the_driver(store: Store) -> None:
    with store.write() as conn:
        inserted = _INSERT.run_many(conn, [(10 + i, f"b{i}", i, "job1") for i in range(6)])
        assert inserted.rowcount == 6
        # Lists of two lengths: each has its own SQL; the state constant is in it.
        assert _TAKE.run(conn, "w1", "job1", [1, 3]).rowcount == 2
        assert _TAKE.run(conn, "w2", "job1", [0, 1, 2]).rowcount == 2  # 1 is leased already
        rows = _FIRST.run(conn, "job1", 4).all()
    assert [(r.seq, r.state, r.attempts, r.lease_owner) for r in rows] == [
        (0, "leased", 1, "w2"),
        (1, "leased", 1, "w1"),
        (2, "leased", 1, "w2"),
        (3, "leased", 1, "w1"),
    ]
    with store.read() as conn:
        sizes = conn.execute(
            sa.select(t.batches.c.seq, t.batches.c.batch_id, t.batches.c.payload_size)
            .where(t.batches.c.job_id == "job1")
            .order_by(t.batches.c.seq)
        ).all()
    assert [tuple(row) for row in sizes] == [(i, f"b{i}", 10 + i) for i in range(6)]
    dialect = store.engine.dialect.name
    sql = {n: text for (name, n), (text, _) in _TAKE._compiled.items() if name == dialect}
    assert sorted(sql) == [2, 3]
    assert all("'queued'" in text and "'leased'" in text for text in sql.values())


def test_a_failing_statement_rolls_its_transaction_back(store: Store) -> None:
    with store.write() as conn:
        _INSERT.run_many(conn, [(1, "b0", 0, "job1")])
    try:
        with store.write() as conn:
            _INSERT.run_many(conn, [(1, "b1", 1, "job1"), (1, "b0", 2, "job1")])  # b0 again
    except sa.exc.IntegrityError:
        pass
    else:
        raise AssertionError("a duplicate batch id was written")
    with store.read() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(t.batches)).scalar_one()
    assert count == 1
