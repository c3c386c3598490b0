"""The ledger's storage: an SQLAlchemy engine, read/write transactions, migrations.

SQLite (a file, WAL journal) is the embedded default; any SQLAlchemy URL works, and
PostgreSQL is tested.

On SQLite every write goes through one writer thread (group commit): it takes whatever
writes are queued, runs each in its own savepoint inside one `BEGIN IMMEDIATE`
transaction, commits once (one fsync for the group), and only then answers each caller.
A write that fails rolls back its savepoint alone. Under load this turns N fsyncs into
one; alone, a write costs what it would cost anyway. Reads run concurrently on their
own WAL snapshot.

On PostgreSQL callers write in their own transactions; the write path takes row locks in
a fixed order, and a transaction that still loses a deadlock or serialization race is
retried from the start (it is one transaction, so a retry never counts anything twice).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from coordinator.errors import CoordinatorError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITE_ATTEMPTS = 5
MAX_GROUP = 64  # writes committed together at most
CHECKPOINT_INTERVAL = 1.0  # seconds between background WAL checkpoints (SQLite)
WAL_RESET_BYTES = 32 * 2**20  # a WAL past this size is truncated by the writer thread
WAL_RESET_CHECK = 5.0  # seconds between checks of the WAL's size
_RETRY_PGCODES = {"40001", "40P01"}  # serialization failure, deadlock detected
MIGRATION_LOCK = 0x686F726465  # PostgreSQL advisory lock key held while migrating ("horde")


class StorageError(CoordinatorError):
    """The ledger database cannot be opened, migrated or written."""


class Storage:
    """One database: `read()` and `write()` transactions, `upgrade()` to the newest schema."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8
                 ) -> None:
        try:
            self.url = make_url(url)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises several kinds
            raise StorageError(f"cannot parse database URL: {exc}") from exc
        self.dialect = self.url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._committer: _GroupCommitter | None = None
        if self.is_sqlite:
            self.engine = self._sqlite_engine(sqlite_synchronous, pool_size)
            self._committer = _GroupCommitter(self)
        else:
            self.engine = create_engine(self.url, pool_size=pool_size, max_overflow=8,
                                        pool_pre_ping=True)

    def _sqlite_engine(self, synchronous: str, pool_size: int) -> Engine:
        database = self.url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise StorageError(
                "the SQLite ledger must be a file (sqlite:///path/ledger.db): an in-memory "
                "database would lose every acknowledged report on exit")
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url, pool_size=pool_size, max_overflow=8,
            connect_args={"check_same_thread": False,
                          "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000.0})
        mode = synchronous.upper()

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from the driver: SQLAlchemy's BEGIN below is real.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={mode}")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # Checkpoints run on the checkpointer thread, not inside someone's commit.
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("horde_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def __repr__(self) -> str:
        return f"Storage({self.url.render_as_string(hide_password=True)!r})"

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (one consistent snapshot)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back on error."""
        if self._write_lock is not None:
            with self._write_lock, self.engine.connect() as conn:
                conn = conn.execution_options(horde_write=True)
                with conn.begin():
                    yield conn
            return
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def run_write(self, work: Callable[[Connection], T]) -> T:
        """Run `work(conn)` atomically and durably; returns once it is committed.

        SQLite: through the group committer. PostgreSQL: in its own transaction,
        retried when it loses a deadlock or serialization race.
        """
        if self._committer is not None:
            return self._committer.submit(work)
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.write() as conn:
                    return work(conn)
            except (OperationalError, DBAPIError) as exc:
                code = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
                    getattr(exc, "orig", None), "pgcode", None)
                if code in _RETRY_PGCODES and attempt < WRITE_ATTEMPTS:
                    logger.info("write transaction lost a lock race (%s); retrying", code)
                    time.sleep(0.005 * attempt)
                    continue
                raise
        raise AssertionError("unreachable")

    # -- schema -----------------------------------------------------------------------

    def alembic_config(self) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("sqlalchemy.url",
                               self.url.render_as_string(hide_password=False)
                               .replace("%", "%%"))
        return config

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to `revision` (an empty database gets every table)."""
        from alembic import command

        config = self.alembic_config()
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(horde_write=True)
                config.attributes["connection"] = conn
                if self._write_lock is not None:
                    with self._write_lock:
                        command.upgrade(config, revision)
                else:
                    if self.dialect == "postgresql":
                        # Coordinators started together on one empty database migrate one
                        # after the other: the later ones then find it at the newest schema.
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    command.upgrade(config, revision)
                conn.commit()
        except DBAPIError as exc:
            raise StorageError(f"cannot migrate the ledger at {self!r}: {exc.orig}") from exc

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        from alembic.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None
        return head

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def dispose(self) -> None:
        """Stop the writer thread (after the queued writes) and close connections."""
        if self._committer is not None:
            self._committer.stop()
        self.engine.dispose()


class _GroupCommitter:
    """The single SQLite writer: queued writes, one savepoint each, one commit per group."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._queue: queue.SimpleQueue[tuple[Callable[[Connection], Any], Future] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self._wal_checked = time.monotonic()

    def submit(self, work: Callable[[Connection], T]) -> T:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise StorageError("a write must not start another write (it would wait on itself)")
        if self._stopped:
            raise StorageError("the ledger is closed")
        self._ensure_started()
        future: Future[T] = Future()
        self._queue.put((work, future))
        return future.result()

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="horde-ledger-writer")
                self._thread.start()
                self._checkpointer = threading.Thread(target=self._checkpoints, daemon=True,
                                                      name="horde-ledger-checkpoint")
                self._checkpointer.start()

    def stop(self) -> None:
        with self._start_lock:
            self._stopped = True
            thread, self._thread = self._thread, None
        self._stop_checkpoints.set()
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=30)
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        self._checkpoint()  # leave a small WAL behind

    def _checkpoints(self) -> None:
        """Copy committed pages from the WAL into the database file in the background
        (PASSIVE: never waits for, nor blocks, readers and the writer)."""
        while not self._stop_checkpoints.wait(CHECKPOINT_INTERVAL):
            self._checkpoint()

    def _checkpoint(self, mode: str = "PASSIVE") -> None:
        try:
            raw = self.storage.engine.raw_connection()
            try:
                raw.driver_connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            finally:
                raw.close()
        except Exception:  # noqa: BLE001 - the next round tries again
            logger.warning("background WAL checkpoint failed", exc_info=True)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            stop = False
            while len(group) < MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            self._commit(group)
            self._maybe_reset_wal()
            if stop:
                return

    def _maybe_reset_wal(self) -> None:
        """Truncate a WAL that passive checkpoints could not recycle.

        Readers come and go all the time under load, so SQLite rarely finds the moment
        to start the WAL over and it keeps growing. Between two groups (no write is in
        flight), a TRUNCATE checkpoint waits for the current readers, copies the few
        frames the background checkpoints have not, and empties the file.
        """
        now = time.monotonic()
        if now - self._wal_checked < WAL_RESET_CHECK:
            return
        self._wal_checked = now
        wal = Path(f"{self.storage.url.database}-wal")
        try:
            if wal.stat().st_size < WAL_RESET_BYTES:
                return
        except OSError:
            return
        self._checkpoint("TRUNCATE")

    def _commit(self, group: list[tuple[Callable[[Connection], Any], Future]]) -> None:
        outcomes: list[tuple[Future, Any, BaseException | None]] = []
        try:
            with self.storage.write() as conn:
                for work, future in group:
                    if not future.set_running_or_notify_cancel():
                        continue
                    savepoint = conn.begin_nested()
                    try:
                        value = work(conn)
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        savepoint.rollback()
                        outcomes.append((future, None, exc))
                    else:
                        savepoint.commit()
                        outcomes.append((future, value, None))
        except BaseException as exc:  # noqa: BLE001 - the commit failed: nobody's write holds
            logger.exception("ledger commit of %d write(s) failed", len(group))
            for _work, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, value, error in outcomes:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
