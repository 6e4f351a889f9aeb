"""Engine and session factory for the index, created once per process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs.errors import IndexConflict, IndexUnavailable
from pacs.settings import Settings

PING_IDLE_S = 1.0  # a pooled connection idle this long is pinged before use
_IDLE = 0  # libpq's PQTRANS_IDLE: no transaction open (psycopg2 and psycopg report it as this number)


def make_engine(
    url: str, *, pool_size: int = 5, echo: bool = False, flush_commits: bool = True, autocommit: bool = False
) -> Engine:
    """An engine for the index at ``url``.

    ``flush_commits=False`` (SQLite only) commits without flushing the log:
    see :meth:`Database.transaction`.  ``autocommit`` (not SQLite): every
    statement is its own transaction, see :meth:`Database.autocommit`.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})
        synchronous = "FULL" if flush_commits else "NORMAL"

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # WAL lets readers run beside the one writer.  In WAL mode FULL
            # flushes the log at every commit; NORMAL only at checkpoints, so a
            # commit survives a crash of the process but not of the machine.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            # DICOM matching is case-sensitive (PS3.4 C.2.2.2.1), and so an index serves LIKE.
            cur.execute("PRAGMA case_sensitive_like=ON")
            cur.close()

        return engine
    engine = create_engine(
        url,
        echo=echo,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {},
    )
    _ping_idle_connections(engine, PING_IDLE_S)
    return engine


def _ping_idle_connections(engine: Engine, idle_s: float) -> None:
    """Check a pooled connection before use when it has been idle for ``idle_s``.

    A restarted server must not poison the pool, but SQLAlchemy's
    ``pool_pre_ping`` costs a round trip on every checkout, two per stored
    instance.  A connection that sat in the pool for ``idle_s`` or more is
    pinged, and a dead one replaced before the caller sees it; one given back
    less than ``idle_s`` ago is used as is, so a server that went away within
    that second fails the next transaction with :class:`IndexUnavailable`,
    as it would had it gone away during that transaction; that failure
    drops every pool's idle connections (``Database._drop_pooled_connections``),
    so it is the only one.
    """

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record):  # noqa: ANN001
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn, record, _proxy):  # noqa: ANN001
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < idle_s:
            return  # new, or in use moments ago
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as exc:  # noqa: BLE001 - any failure: replace the connection
            # the pool discards this connection and checks out another (a new one if need be)
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


class Database:
    """The index's engine and sessions.  Transactions belong to the caller."""

    def __init__(self, url: str, *, pool_size: int = 5, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # commits that need not be flushed: a second pool, its connections at synchronous=NORMAL
        on_disk_sqlite = url.startswith("sqlite") and url.split("?")[0] not in ("sqlite://", "sqlite:///:memory:")
        self._unflushed = make_engine(url, echo=echo, flush_commits=False) if on_disk_sqlite else self.engine
        # statements that commit alone: a pool of their own (engines connect lazily)
        self._autocommit = None if url.startswith("sqlite") else make_engine(url, pool_size=pool_size, echo=echo,
                                                                            autocommit=True)

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
            if exc.connection_invalidated:
                self._drop_pooled_connections()
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise _unavailable(exc) from exc
            raise
        except BaseException:
            _quiet_rollback(session)
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self, *, flush_commit: bool = True) -> Iterator[Connection]:
        """A Core connection in a transaction: commits on success, rolls back on error.

        The lighter sibling of :meth:`session` for hot paths that run prebuilt
        statements; failures are mapped the same way.

        ``flush_commit=False`` lets the commit return before it is on disk
        (SQLite in WAL mode with ``synchronous=NORMAL``: it survives a crash
        of the process, and may be lost with a crash of the machine, as a
        whole transaction, never half of one; the log is a sequence, so what
        is lost is the last transactions).  Only for what can be redone from
        storage after such a crash: the indexing of an object appended to a
        local pack (:mod:`pacs.ingest.recovery`).  Ignored on other
        databases, whose commits are always flushed.
        """
        engine = self.engine if flush_commit else self._unflushed
        with _unavailable_mapped(self):
            with engine.begin() as conn:
                yield conn

    @property
    def statements_commit_alone(self) -> bool:
        """Whether :meth:`autocommit` gives connections whose statements commit one by one (not SQLite)."""
        return self._autocommit is not None

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection on which every statement is a transaction of its own, committed (and flushed) as it returns.

        For a hot path whose writes are one statement each: no ``BEGIN``
        and ``COMMIT`` round trips around them; or whose ``COMMIT`` rides
        with its last statement (:func:`explicit_transaction`).  Its connections come from a
        pool of their own, so that the main pool's connections never change
        mode.  Not on SQLite (:attr:`statements_commit_alone` is False):
        there a transaction costs no round trip.  Failures are mapped as in
        :meth:`session`.
        """
        if self._autocommit is None:
            raise NotImplementedError("autocommit connections are for client-server index databases")
        with _unavailable_mapped(self):
            with self._autocommit.connect() as conn:
                yield conn

    def _drop_pooled_connections(self) -> None:
        """After a connection was found lost (SQLAlchemy saw a disconnect, not a lock timeout or a
        refused connect), close the idle ones of every pool: they are most likely lost too (a restarted
        server), and each would otherwise fail one more request before its pool replaced it (SQLAlchemy
        renews only the pool that saw the disconnect).  Connections in use are dropped when they come back."""
        for engine in {self.engine, self._unflushed, self._autocommit} - {None}:
            engine.dispose()

    def describe(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._unflushed is not self.engine:
            self._unflushed.dispose()
        if self._autocommit is not None:
            self._autocommit.dispose()


@contextmanager
def explicit_transaction(conn: Connection) -> Iterator[Connection]:
    """A transaction begun by hand on an :meth:`Database.autocommit` connection.

    The body's first statement carries the ``BEGIN`` in its own round trip
    (:func:`pacs.index.repository.insert_into_indexed_series` with
    ``begin``), and its last the ``COMMIT``
    (:func:`pacs.index.repository.count_in_and_commit`).  Whatever the body
    leaves open (it raised, or chose not to commit) is rolled back before
    the connection goes back to its pool; a connection that cannot roll
    back is dropped from the pool.
    """
    try:
        yield conn
    finally:
        if not conn.invalidated and conn.connection.driver_connection.info.transaction_status != _IDLE:
            try:
                conn.exec_driver_sql("ROLLBACK")
            except Exception:  # the connection is gone; the server ends the transaction with it
                conn.invalidate()


@contextmanager
def _unavailable_mapped(db: Database) -> Iterator[None]:
    """Raise a connection-level failure of the index as :class:`IndexUnavailable`."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        if exc.connection_invalidated:
            db._drop_pooled_connections()
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise _unavailable(exc) from exc
        raise


# Postgres' SQLSTATEs for a transaction rolled back because of a concurrent one.
_CONFLICT_STATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure


def _unavailable(exc: DBAPIError) -> IndexUnavailable:
    """The error to raise for a failure of the index: a conflict (worth running again) or unavailability."""
    if getattr(exc.orig, "pgcode", None) in _CONFLICT_STATES:
        return IndexConflict(f"index transaction conflicted with a concurrent one: {exc.orig}")
    return IndexUnavailable(f"index database unavailable: {exc.orig}")


def _quiet_rollback(session: Session) -> None:
    """Roll back, ignoring a second failure of a connection that is already gone."""
    try:
        session.rollback()
    except DBAPIError:
        pass
