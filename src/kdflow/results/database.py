"""The DuckDB database: every table of :data:`~kdflow.results.tables.TABLES`, with its comments, into a new file
renamed into place once complete."""

from __future__ import annotations

from pathlib import Path

from kdflow.atomic import atomic_path
from kdflow.results.readers import Collected
from kdflow.results.rows import table_rows
from kdflow.results.stats import Summary
from kdflow.results.tables import TABLES


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _create(con, name: str, comment: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    import pyarrow as pa

    con.execute(f"CREATE TABLE {name} (" + ", ".join(f'"{c}" {t}' for c, t, _ in columns) + ")")
    con.execute(f"COMMENT ON TABLE {name} IS {_sql_str(comment)}")
    for col, _, text in columns:
        con.execute(f'COMMENT ON COLUMN {name}."{col}" IS {_sql_str(text)}')
    if not rows:
        return
    types = {
        "VARCHAR": pa.string(),
        "INTEGER": pa.int32(),
        "BIGINT": pa.int64(),
        "DOUBLE": pa.float64(),
        "BOOLEAN": pa.bool_(),
    }
    table = pa.table({c: pa.array([r.get(c) for r in rows], types[t]) for c, t, _ in columns})
    con.register("_kdflow_rows", table)
    try:
        con.execute(f"INSERT INTO {name} SELECT * FROM _kdflow_rows")
    finally:
        con.unregister("_kdflow_rows")


def write_database(c: Collected, s: Summary, db_path: str | Path) -> Path:
    """Every table into a new DuckDB file, renamed onto ``db_path`` once complete."""
    import duckdb

    db_path = Path(db_path)
    data = table_rows(c, s)
    with atomic_path(db_path) as tmp:
        wal = tmp.with_name(tmp.name + ".wal")
        con = duckdb.connect(str(tmp))
        try:
            for name, (comment, columns) in TABLES.items():
                _create(con, name, comment, columns, data[name])
            con.execute("CHECKPOINT")
        finally:
            con.close()
            wal.unlink(missing_ok=True)  # empty after the checkpoint; a failed write leaves nothing behind
    return db_path
