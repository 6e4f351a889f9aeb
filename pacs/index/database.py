"""Engine and session factory for the index, created once per process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs.errors import IndexUnavailable
from pacs.settings import Settings


def make_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer; NORMAL is durable in WAL
            # mode against process crashes, FULL also against power loss.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            # DICOM matching is case-sensitive (PS3.4 C.2.2.2.1), and so an index serves LIKE.
            cur.execute("PRAGMA case_sensitive_like=ON")
            cur.close()

        return engine
    return create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # a restarted Postgres must not poison the pool
        pool_recycle=1800,
        connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {},
    )


class Database:
    """The index's engine and sessions.  Transactions belong to the caller."""

    def __init__(self, url: str, *, pool_size: int = 5, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        if settings.index_url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.index_url, pool_size=settings.index.pool_size, echo=settings.index.echo_sql)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error.

        Connection-level failures surface as :class:`IndexUnavailable`.
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (OperationalError, DBAPIError) as exc:
            _quiet_rollback(session)
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise IndexUnavailable(f"index database unavailable: {exc.orig}") from exc
            raise
        except BaseException:
            _quiet_rollback(session)
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction: commits on success, rolls back on error.

        The lighter sibling of :meth:`session` for hot paths that run prebuilt
        statements; failures are mapped the same way.
        """
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise IndexUnavailable(f"index database unavailable: {exc.orig}") from exc
            raise

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def _quiet_rollback(session: Session) -> None:
    """Roll back, ignoring a second failure of a connection that is already gone."""
    try:
        session.rollback()
    except DBAPIError:
        pass
