"""The gateway's store: API keys (hashes only), exact per-key budgets, spent PoW challenges, the query log.

One schema on two engines: SQLite (default; WAL journal, a file beside the server's state) and
PostgreSQL (``postgresql://...``, psycopg 3). Budgets are exact under concurrency and across
processes: :meth:`Store.reserve` adds the rows to the key's ``reserved`` column with one conditional
``UPDATE`` (``used + reserved + n <= budget``) and records the reservation in the same transaction;
:meth:`Store.commit` moves them to ``used`` and writes the query log row in one transaction;
:meth:`Store.release` gives them back. A detector's per-key statistics (rows scored, score sum,
rows flagged) are added in the commit's transaction (table ``detector_stats``). A reservation left by
a killed server is released by :meth:`Store.expire_reservations` once its timeout has passed (called
at start and on every reserve).

Schema versioned in ``meta.schema_version`` (:data:`SCHEMA_VERSION`); a store written by a newer
version is refused with a one-line message.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from contextlib import contextmanager

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: detector_stats table, queries.flagged_rows
#: seconds after which a reservation whose request never finished is released
RESERVATION_TIMEOUT = 120.0

_TABLES = {
    "meta": "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
    "keys": ("CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
             "hash TEXT NOT NULL UNIQUE, budget BIGINT, used BIGINT NOT NULL DEFAULT 0, "
             "reserved BIGINT NOT NULL DEFAULT 0, rate TEXT, admin INTEGER NOT NULL DEFAULT 0, "
             "revoked INTEGER NOT NULL DEFAULT 0, created DOUBLE PRECISION NOT NULL, "
             "CHECK (used >= 0), CHECK (reserved >= 0))"),
    "reservations": ("CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, "
                     "rows_n BIGINT NOT NULL, expires DOUBLE PRECISION NOT NULL)"),
    "spent": "CREATE TABLE IF NOT EXISTS spent (id TEXT PRIMARY KEY, expires DOUBLE PRECISION NOT NULL)",
    "queries": ("CREATE TABLE IF NOT EXISTS queries (id {serial}, key_id TEXT, ts DOUBLE PRECISION NOT NULL, "
                "rows_n BIGINT NOT NULL, batch_sha256 TEXT, output TEXT, pow_bits INTEGER, "
                "detector_score DOUBLE PRECISION, latency_ms DOUBLE PRECISION, status INTEGER NOT NULL, "
                "reason TEXT, flagged_rows INTEGER)"),
    "detector_stats": ("CREATE TABLE IF NOT EXISTS detector_stats (key_id TEXT PRIMARY KEY, "
                       "rows_n BIGINT NOT NULL DEFAULT 0, score_sum DOUBLE PRECISION NOT NULL DEFAULT 0, "
                       "flagged BIGINT NOT NULL DEFAULT 0)"),
}
_INDEXES = ["CREATE INDEX IF NOT EXISTS queries_key ON queries (key_id, id)",
            "CREATE INDEX IF NOT EXISTS reservations_expires ON reservations (expires)"]


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored (never the key itself)."""

    id: str
    name: str
    budget: int | None
    used: int
    reserved: int
    rate: str | None
    admin: bool
    revoked: bool
    created: float

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used - self.reserved


_KEY_COLS = "id, name, budget, used, reserved, rate, admin, revoked, created"


def _key(row: Any) -> KeyRecord:
    return KeyRecord(id=row[0], name=row[1], budget=None if row[2] is None else int(row[2]), used=int(row[3]),
                     reserved=int(row[4]), rate=row[5], admin=bool(row[6]), revoked=bool(row[7]),
                     created=float(row[8]))


class Committed(NamedTuple):
    """What :meth:`Store.commit` counted: ``rows`` answered, the key's ``remaining`` budget after (``None``:
    unlimited)."""

    rows: int
    remaining: int | None


class BudgetExceeded(MisleaderError):
    """The key's remaining budget is smaller than the batch (nothing was reserved)."""

    def __init__(self, message: str, *, remaining: int) -> None:
        super().__init__(message)
        self.remaining = remaining


class Store:
    """The store over a DB-API connection factory and a small pool of connections (see :meth:`_borrow`).

    Args:
        url: ``sqlite:///PATH``, a plain file path (SQLite), or ``postgresql://...``.
    """

    #: most connections open at once (PostgreSQL's default ``max_connections`` is 100, shared by replicas)
    max_open: int = 32
    #: idle connections kept for reuse
    max_idle: int = 8
    #: seconds a store call waits for a free connection before it fails
    wait_s: float = 60.0

    def __init__(self, url: str | Path) -> None:
        url = str(url)
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if not self.postgres:
            path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
            if "://" in path:
                raise MisleaderError(f"--db {url!r}: use a file path, sqlite:///PATH or postgresql://...")
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._last_expiry = 0.0
        self._idle: list[Any] = []
        self._in_use = 0
        self._closed = False
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_open)
        # SQLite has one writer at a time, and a connection that finds the write lock taken *sleeps* in
        # SQLite's busy handler (1, 2, 5, 10 ... ms steps), however soon the lock is free again: with
        # concurrent requests most of their time went to those sleeps. This process's writers queue on
        # this mutex instead (woken as soon as it is free); the busy handler still arbitrates between
        # processes sharing the file. PostgreSQL needs no such queue (row locks, no global writer lock).
        self._write_lock = threading.Lock() if not self.postgres else None
        self._init_schema()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> Any:
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise MisleaderError("PostgreSQL stores need psycopg: pip install 'misleader[serve]'") from None
            try:
                conn = psycopg.connect(self.url, autocommit=True)
            except psycopg.OperationalError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MisleaderError(f"cannot connect to {self._safe_url()}: {first}: check --db") from None
            return conn
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def _safe_url(self) -> str:
        if not self.postgres:
            return str(self.path)
        head, at, tail = self.url.rpartition("@")
        return f"postgresql://***@{tail}" if at else self.url

    @contextmanager
    def _borrow(self) -> Iterator[Any]:
        """A connection of the pool for one statement or transaction; returned afterwards.

        The server runs its store calls on a thread pool whose idle threads are retired and replaced, so a
        connection per *thread* would leak one open connection per retired thread (PostgreSQL then refuses
        new clients: "too many clients already"). The pool instead keeps at most :attr:`max_idle` idle
        connections and opens at most :attr:`max_open` at once (a caller beyond it waits up to
        :attr:`wait_s` seconds). A connection whose driver raised (or that was interrupted) is closed, not
        returned; after the store's own errors (a refused reservation, rolled back) it is reused.
        """
        if not self._slots.acquire(timeout=self.wait_s):
            raise MisleaderError(f"store {self._safe_url()}: all {self.max_open} connections busy for "
                                 f"{self.wait_s:.0f}s: the server is overloaded")
        try:
            conn = self._checkout()
            ok = False
            try:
                yield conn
                ok = True
            except BaseException as exc:
                ok = not _is_db_error(exc)  # e.g. a refused reservation (rolled back): the connection is fine
                raise
            finally:
                self._checkin(conn, keep=ok)
        finally:
            self._slots.release()

    def _checkout(self) -> Any:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        with self._lock:
            self._in_use += 1
        return conn

    def _checkin(self, conn: Any, *, keep: bool) -> None:
        with self._lock:
            self._in_use -= 1
            keep = keep and not self._closed and len(self._idle) < self.max_idle
            if keep:
                self._idle.append(conn)
        if not keep:
            _close_quietly(conn)

    def close(self) -> None:
        """Close the pool's idle connections (those in use are closed when they come back)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            _close_quietly(c)

    def open_connections(self) -> int:
        """Connections currently open by this store (idle + in use); for tests and the metrics."""
        with self._lock:
            return len(self._idle) + self._in_use

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One write transaction (SQLite: ``BEGIN IMMEDIATE``, the writer lock taken up front, after this
        process's other writers: see ``_write_lock``)."""
        with self._write_lock or contextlib.nullcontext(), self._borrow() as conn:
            cur = conn.cursor()
            cur.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")  # the connection goes back clean (if this fails, it is closed)
                raise
            cur.execute("COMMIT")

    def _exec(self, cur: Any, sql: str, params: tuple = ()) -> Any:
        cur.execute(self._sql(sql), params)
        return cur

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._borrow() as conn:
            cur = conn.cursor()
            cur.execute(self._sql(sql), params)
            return [tuple(r) for r in cur.fetchall()]

    def _init_schema(self) -> None:
        serial = "BIGSERIAL PRIMARY KEY" if self.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
        with self._tx() as cur:
            if self.postgres:  # concurrent first starts (replicas) create the schema once
                cur.execute("SELECT pg_advisory_xact_lock(724163)")
            for sql in _TABLES.values():
                cur.execute(sql.format(serial=serial))
            for sql in _INDEXES:
                cur.execute(sql)
            self._exec(cur, "SELECT v FROM meta WHERE k = ?", ("schema_version",))
            row = cur.fetchone()
            if row is None:
                self._exec(cur, "INSERT INTO meta (k, v) VALUES (?, ?)", ("schema_version", str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise MisleaderError(f"store {self._safe_url()} has schema version {row[0]}, newer than this "
                                     f"misleader's {SCHEMA_VERSION}: upgrade misleader")
            elif int(row[0]) < SCHEMA_VERSION:  # migrate: 1 -> 2 adds queries.flagged_rows (the table is new)
                if int(row[0]) < 2:
                    cur.execute("ALTER TABLE queries ADD COLUMN flagged_rows INTEGER")
                self._exec(cur, "UPDATE meta SET v = ? WHERE k = ?", (str(SCHEMA_VERSION), "schema_version"))
        self.expire_reservations()

    # ------------------------------------------------------------------ keys
    def add_key(self, *, name: str, key_hash: str, budget: int | None, rate: str | None = None,
                admin: bool = False) -> KeyRecord:
        """Insert a key (its hash only); a duplicate name is a :class:`MisleaderError`."""
        if budget is not None and budget < 0:
            raise MisleaderError(f"budget must be >= 0, got {budget}")
        kid = secrets.token_hex(6)
        try:
            with self._tx() as cur:
                self._exec(cur, "SELECT 1 FROM api_keys WHERE name = ?", (name,))
                if cur.fetchone() is not None:
                    raise MisleaderError(f"a key named {name!r} exists: pick another name or revoke it")
                self._exec(cur, "INSERT INTO api_keys (id, name, hash, budget, rate, admin, created) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (kid, name, key_hash, budget, rate, int(admin), time.time()))
        except MisleaderError:
            raise
        except Exception as exc:  # unique violation raced by another process
            if "unique" in str(exc).lower():
                raise MisleaderError(f"a key named {name!r} exists: pick another name or revoke it") from None
            raise
        return self.get_key(name)

    def get_key(self, name_or_id: str) -> KeyRecord:
        rows = self._query(f"SELECT {_KEY_COLS} FROM api_keys WHERE name = ? OR id = ?", (name_or_id, name_or_id))
        if not rows:
            raise MisleaderError(f"no key named {name_or_id!r}: see `misleader keys list`")
        return _key(rows[0])

    def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        rows = self._query(f"SELECT {_KEY_COLS} FROM api_keys WHERE hash = ?", (key_hash,))
        return _key(rows[0]) if rows else None

    def list_keys(self) -> list[KeyRecord]:
        return [_key(r) for r in self._query(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY created, name")]

    def revoke(self, name_or_id: str) -> KeyRecord:
        k = self.get_key(name_or_id)
        with self._tx() as cur:
            self._exec(cur, "UPDATE api_keys SET revoked = 1 WHERE id = ?", (k.id,))
        return self.get_key(k.id)

    def set_budget(self, name_or_id: str, budget: int | None) -> KeyRecord:
        if budget is not None and budget < 0:
            raise MisleaderError(f"budget must be >= 0, got {budget}")
        k = self.get_key(name_or_id)
        with self._tx() as cur:
            self._exec(cur, "UPDATE api_keys SET budget = ? WHERE id = ?", (budget, k.id))
        return self.get_key(k.id)

    # ------------------------------------------------------------------ budgets
    def reserve(self, key_id: str, rows: int, *, timeout: float = RESERVATION_TIMEOUT) -> str:
        """Reserve ``rows`` of the key's budget (one transaction); returns the reservation id.

        Raises:
            BudgetExceeded: fewer than ``rows`` remain (nothing reserved); ``.remaining`` says how many do.
        """
        now = time.time()
        if now - self._last_expiry > 1.0:  # at most once a second per store object
            self._last_expiry = now
            self.expire_reservations(now=now)
        rid = secrets.token_hex(12)
        with self._tx() as cur:
            self._exec(cur, "UPDATE api_keys SET reserved = reserved + ? WHERE id = ? AND revoked = 0 AND "
                            "(budget IS NULL OR used + reserved + ? <= budget)", (rows, key_id, rows))
            ok = cur.rowcount == 1
            if ok:
                self._exec(cur, "INSERT INTO reservations (id, key_id, rows_n, expires) VALUES (?, ?, ?, ?)",
                           (rid, key_id, rows, now + timeout))
        if not ok:
            k = self.get_key(key_id)
            remaining = max(0, k.remaining or 0)
            raise BudgetExceeded(f"query of {rows} rows refused: {remaining} of the key's budget of {k.budget} "
                                 f"remaining", remaining=remaining)
        return rid

    def _take(self, cur: Any, rid: str) -> tuple[str, int] | None:
        """Delete a reservation; its ``(key_id, rows)``, or ``None`` when it is gone (expired and released)."""
        self._exec(cur, "DELETE FROM reservations WHERE id = ? RETURNING key_id, rows_n", (rid,))
        row = cur.fetchone()
        return None if row is None else (row[0], int(row[1]))

    def _give_back(self, cur: Any, rid: str) -> int | None:
        """Release a reservation's rows to its key; how many, or ``None`` when it is gone."""
        taken = self._take(cur, rid)
        if taken is None:
            return None
        key_id, n = taken
        self._exec(cur, "UPDATE api_keys SET reserved = reserved - ? WHERE id = ?", (n, key_id))
        return n

    def commit(self, rid: str, *, log_row: dict[str, Any], answered: int | None = None,
               scores: tuple[int, float, int] | None = None) -> Committed | None:
        """Count a reservation's rows as used and log the query, in one transaction.

        Args:
            answered: rows actually answered (default: all reserved); the rest are released (refused rows).
            scores: ``(rows scored, score sum, rows flagged)`` added to the key's detector statistics.

        Returns:
            ``Committed(rows, remaining)`` (the key's remaining budget just after), or ``None`` when the
            reservation had already expired (its rows were released; the caller must not answer).
        """
        with self._tx() as cur:
            taken = self._take(cur, rid)
            if taken is None:
                return None
            key_id, n = taken
            m = n if answered is None else int(answered)
            if not 0 <= m <= n:
                raise ValueError(f"answered rows {m} outside [0, {n}] of the reservation")
            self._exec(cur, "UPDATE api_keys SET used = used + ?, reserved = reserved - ? WHERE id = ? "
                            "RETURNING budget, used, reserved", (m, n, key_id))
            budget, used, reserved = cur.fetchone()
            self._log(cur, {**log_row, "rows": m})
            if scores is not None:
                self._add_scores(cur, str(log_row["key_id"]), scores)
        return Committed(m, None if budget is None else int(budget) - int(used) - int(reserved))

    def _add_scores(self, cur: Any, key_id: str, scores: tuple[int, float, int]) -> None:
        rows, total, flagged = int(scores[0]), float(scores[1]), int(scores[2])
        self._exec(cur, "INSERT INTO detector_stats (key_id, rows_n, score_sum, flagged) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (key_id) DO UPDATE SET rows_n = detector_stats.rows_n + excluded.rows_n, "
                        "score_sum = detector_stats.score_sum + excluded.score_sum, "
                        "flagged = detector_stats.flagged + excluded.flagged", (key_id, rows, total, flagged))

    def detector_stats(self, key_id: str | None = None) -> dict[str, Any]:
        """Per key id (all, or only ``key_id``): its :class:`misleader.detect.same.ClientStats`
        (``queries`` = rows scored, ``score_sum``, ``flagged`` rows)."""
        from misleader.detect.same import ClientStats

        sql = "SELECT key_id, rows_n, score_sum, flagged FROM detector_stats"
        rows = self._query(sql, ()) if key_id is None else self._query(sql + " WHERE key_id = ?", (key_id,))
        return {r[0]: ClientStats(queries=int(r[1]), score_sum=float(r[2]), flagged=int(r[3])) for r in rows}

    def release(self, rid: str, *, log_row: dict[str, Any] | None = None) -> None:
        """Give a reservation's rows back (the model failed; nothing was answered)."""
        with self._tx() as cur:
            self._give_back(cur, rid)
            if log_row is not None:
                self._log(cur, log_row)

    def expire_reservations(self, *, now: float | None = None) -> int:
        """Release every reservation past its timeout (left by a killed server); returns how many."""
        now = time.time() if now is None else now
        done = 0
        rows = self._query("SELECT id FROM reservations WHERE expires < ?", (now,))
        for (rid,) in rows:
            with self._tx() as cur:
                if self._give_back(cur, rid) is not None:
                    done += 1
        if done:
            log.warning("released %d reservation(s) left past their timeout", done)
        return done

    # ------------------------------------------------------------------ PoW double-spend
    def spend(self, challenge_id: str, *, expires: float, now: float) -> bool:
        """:class:`misleader.pow.puzzle.SpentStore`: mark a challenge spent; ``False`` on a replay."""
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM spent WHERE expires < ?", (now,))
            self._exec(cur, "SELECT 1 FROM spent WHERE id = ?", (challenge_id,))
            if cur.fetchone() is not None:
                return False
            self._exec(cur, "INSERT INTO spent (id, expires) VALUES (?, ?)", (challenge_id, expires))
        return True

    # ------------------------------------------------------------------ query log
    _LOG_COLS = ("key_id", "ts", "rows_n", "batch_sha256", "output", "pow_bits", "detector_score", "latency_ms",
                 "status", "reason", "flagged_rows")

    def _log(self, cur: Any, row: dict[str, Any]) -> None:
        values = (row.get("key_id"), float(row.get("ts", time.time())), int(row.get("rows", 0)),
                  row.get("batch_sha256"), row.get("output"), row.get("pow_bits"), row.get("detector_score"),
                  row.get("latency_ms"), int(row["status"]), row.get("reason"), row.get("flagged_rows"))
        self._exec(cur, f"INSERT INTO queries ({', '.join(self._LOG_COLS)}) VALUES "
                        f"({', '.join('?' * len(values))})", values)

    def log_query(self, row: dict[str, Any]) -> None:
        """Log a request that reserved nothing (refused, challenged, malformed)."""
        with self._tx() as cur:
            self._log(cur, row)

    def last_queries(self, n: int = 20) -> list[dict[str, Any]]:
        cols = ("id",) + self._LOG_COLS
        rows = self._query(f"SELECT {', '.join(cols)} FROM queries ORDER BY id DESC LIMIT ?", (int(n),))
        return [dict(zip(cols, r)) for r in rows]

    def logged_rows(self, key_id: str) -> int:
        """Sum of rows of the key's answered (status 200) queries in the log."""
        rows = self._query("SELECT COALESCE(SUM(rows_n), 0) FROM queries WHERE key_id = ? AND status = 200",
                           (key_id,))
        return int(rows[0][0])

    def pending_reservations(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM reservations")[0][0])


def _is_db_error(exc: BaseException) -> bool:
    """An error of the database driver (the connection may be broken), as opposed to the store's own errors."""
    if isinstance(exc, sqlite3.Error):
        return True
    module = type(exc).__module__ or ""
    return module.startswith("psycopg") or not isinstance(exc, Exception)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a broken connection is dropped either way
        pass


def default_db(folder: str | Path) -> str:
    """The SQLite file used when ``--db`` is not given: ``gateway.sqlite3`` beside the served folder."""
    folder = Path(folder).resolve()
    return str(folder.parent / f"{folder.name}.gateway.sqlite3")


__all__ = ["BudgetExceeded", "Committed", "KeyRecord", "RESERVATION_TIMEOUT", "SCHEMA_VERSION", "Store", "default_db"]
