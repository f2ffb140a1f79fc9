"""Opening a SQLAlchemy database that several processes share: the request log and the job store."""

from __future__ import annotations

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError

from tuneloop.errors import TuneloopError


def open_database(url: str, tables: MetaData, what: str, busy_timeout_ms: int = 10_000) -> Engine:
    """The database at `url` with `tables` created (`what` names it in errors). SQLite runs in WAL mode, so
    writers and readers in other processes do not block each other; parameters never reach error messages."""
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        database = create_engine(url, hide_parameters=True)
    except (ArgumentError, ImportError) as err:
        raise TuneloopError(f"{what} {shown}: {err}") from None
    if database.dialect.name == "sqlite":
        @event.listens_for(database, "connect")
        def _pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            cursor.close()
    for attempt in range(3):
        try:
            tables.create_all(database)
            break
        except (ProgrammingError, IntegrityError):  # another process created the tables at the same moment
            if attempt == 2:
                raise
        except OperationalError as err:
            raise TuneloopError(f"{what} {shown}: cannot open it ({str(err.orig)[:200]})") from None
    return database
