"""Review decisions of a results folder, in ``RESULTS_DIR/review.sqlite``.

The review app (``traitloc app``) records, per result, whether a map is accepted, rejected or needs work, with a
free-text note and a history of every change; exports (:mod:`traitloc.pipelines.export`) read the accepted ones.
Tables, result ids, concurrency and durability: ``docs/store.md`` ("Review decisions and the review app").

Examples
--------
>>> store = ReviewStore("results")                                   # doctest: +SKIP
>>> store.set("chelsea/red-epaulets", "accepted", "clear wing patch")  # doctest: +SKIP
>>> store.get("chelsea/red-epaulets").status                          # doctest: +SKIP
'accepted'
"""

from __future__ import annotations

import getpass
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar, cast

__all__ = [
    "DB_NAME",
    "STATUSES",
    "Decision",
    "HistoryEntry",
    "PathSafetyError",
    "ReviewStore",
    "check_result_id",
    "resolve_inside",
    "result_id_from_map",
]

PathLike = str | os.PathLike[str]
T = TypeVar("T")

#: file name of the review database inside the results folder
DB_NAME = "review.sqlite"
#: the allowed review decisions
STATUSES: tuple[str, ...] = ("accepted", "rejected", "needs-work")
#: schema version stored in ``PRAGMA user_version``
SCHEMA_VERSION = 1
_MAX_NOTE = 10_000
_MAX_ID = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions(
    result_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK(status IN ('accepted','rejected','needs-work')),
    note TEXT NOT NULL DEFAULT '',
    updated_utc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id TEXT NOT NULL,
    action TEXT NOT NULL CHECK(action IN ('set','clear')),
    status TEXT CHECK(status IS NULL OR status IN ('accepted','rejected','needs-work')),
    note TEXT,
    who TEXT NOT NULL,
    updated_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_result ON history(result_id);
"""


class PathSafetyError(ValueError):
    """A path that would leave the results folder (``..``, absolute, or a symlink pointing outside)."""


@dataclass(frozen=True)
class Decision:
    """The current review decision of one result."""

    result_id: str
    status: str
    note: str
    updated_utc: str


@dataclass(frozen=True)
class HistoryEntry:
    """One change in the append-only history (``status``/``note`` are ``None`` for ``clear``)."""

    seq: int
    result_id: str
    action: str
    status: str | None
    note: str | None
    who: str
    updated_utc: str


# ----------------------------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------------------------
def _check_relative(rel: str, what: str) -> PurePosixPath:
    if not isinstance(rel, str):
        raise TypeError(f"{what} must be a string, got {type(rel).__name__}")
    if not rel or "\x00" in rel or "\\" in rel:
        raise PathSafetyError(f"{what} must be a non-empty relative path without backslashes, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise PathSafetyError(f"{what} must be relative to the results folder, got {rel!r}")
    if ".." in p.parts:
        raise PathSafetyError(f"{what} must not contain '..', got {rel!r}")
    return p


def resolve_inside(root: PathLike, rel: str | PathLike, *, must_exist: bool = False) -> Path:
    """Resolve a path given relative to ``root`` (or absolute) and check that it stays inside ``root``.

    Parameters
    ----------
    root : the folder that must contain the path (resolved, symlinks followed).
    rel : a relative POSIX path (``maps/img/concept.tif``); ``..`` components and backslashes are rejected.
        An absolute path (``str`` or ``Path``) is accepted only when it lies inside ``root`` after resolution.
    must_exist : raise ``FileNotFoundError`` when the resolved path does not exist.

    Returns
    -------
    The resolved absolute path (symlinks followed).

    Raises
    ------
    PathSafetyError
        If the path contains ``..``, is absolute outside ``root``, or resolves (through a symlink) outside it.
    """
    base = Path(root).resolve(strict=True)
    text = os.fspath(rel)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise PathSafetyError(f"not a usable path: {text!r}")
    if os.path.isabs(text):
        if ".." in Path(text).parts:
            raise PathSafetyError(f"path must not contain '..', got {text!r}")
        candidate = Path(text)
    else:
        candidate = base.joinpath(*_check_relative(text, "path").parts)
    resolved = candidate.resolve(strict=False)
    if resolved != base and not resolved.is_relative_to(base):
        raise PathSafetyError(f"path {text!r} leaves the folder {str(base)!r}")
    if must_exist and not resolved.exists():
        raise FileNotFoundError(f"{text}: not found in {base}")
    return resolved


def check_result_id(result_id: str) -> str:
    """Validate a ``result_id`` (``<image_key>/<slug>``: a relative POSIX path, no ``..``) and return it."""
    if not isinstance(result_id, str):
        raise TypeError(f"result_id must be a string, got {type(result_id).__name__}")
    if len(result_id) > _MAX_ID:
        raise ValueError(f"result_id longer than {_MAX_ID} characters")
    p = _check_relative(result_id, "result_id")
    if p.as_posix() != result_id or any(c in result_id for c in "\r\n"):
        raise ValueError(f"result_id must be a normalized relative path like 'image_key/slug', got {result_id!r}")
    return result_id


def result_id_from_map(map_path: str) -> str:
    """``maps/<image_key>/<slug>.tif`` (as in ``results.csv``) -> ``<image_key>/<slug>``."""
    p = _check_relative(str(map_path).strip(), "map path")
    parts = p.parts
    if len(parts) < 3 or parts[0] != "maps" or p.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"expected a map path like 'maps/<image_key>/<slug>.tif', got {map_path!r}")
    return check_result_id(PurePosixPath(*parts[1:]).with_suffix("").as_posix())


# ----------------------------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------------------------
def _utc_now() -> str:
    from traitloc.io.files import utc_now

    return utc_now()


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _is_busy(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _checked_decision(result_id: str, status: str, note: str | None) -> str:
    """Validate one decision (id, status, note length); returns the note as text (None -> "")."""
    check_result_id(result_id)
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    text = "" if note is None else str(note)
    if len(text) > _MAX_NOTE:
        raise ValueError(f"note longer than {_MAX_NOTE} characters")
    return text


class ReviewStore:
    """Review decisions of one results folder, in ``RESULTS_DIR/review.sqlite``.

    Parameters
    ----------
    results_dir : the results folder (must exist). The database is created inside it on first use.
    who : the reviewer recorded in the history (default: the operating-system user).
    timeout : seconds to wait for another writer's lock before a retry (SQLite busy timeout).
    retries : how many times a transaction that still finds the database busy is retried (with jittered backoff).
    readonly : open without creating or writing anything (reading an absent database gives no decisions).
    synchronous : ``FULL`` (default: a commit is on disk before :meth:`set` returns, so it survives a power cut)
        or ``NORMAL`` (faster; in WAL mode still safe when the process crashes, but the last commits can roll back
        if the machine loses power).

    Raises
    ------
    PathSafetyError
        If ``review.sqlite`` (or its ``-wal``/``-shm`` files) is a symlink that leaves the results folder.
    """

    def __init__(
        self,
        results_dir: PathLike,
        *,
        who: str | None = None,
        timeout: float = 30.0,
        retries: int = 8,
        readonly: bool = False,
        synchronous: str = "FULL",
    ) -> None:
        root = Path(results_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"results folder not found: {root}")
        self.root = root.resolve()
        self.path = self.root / DB_NAME
        for suffix in ("", "-wal", "-shm", "-journal"):
            side = self.path.with_name(DB_NAME + suffix)
            if side.is_symlink():
                resolve_inside(self.root, side.name)  # raises when the link leaves the folder
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.readonly = bool(readonly)
        if str(synchronous).upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.synchronous = str(synchronous).upper()
        self._local = threading.local()
        self.who = (who if who is not None else _default_user()).strip() or "unknown"
        if not self.readonly:
            self._retry(self._init_db)

    # -- connections -------------------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            uri = self.path.as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        if not self.readonly:
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (one per thread and process: never shared across threads or ``fork``)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or getattr(local, "pid", None) != os.getpid():
            conn = self._open()  # a connection inherited through fork is dropped, not closed (SQLite's rule)
            local.conn, local.pid = conn, os.getpid()
        try:
            yield conn
        except sqlite3.DatabaseError:
            if conn.in_transaction:
                conn.rollback()
            raise

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends or the store is collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry(self, fn: Callable[[], T]) -> T:
        delay = 0.01
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or attempt == self.retries:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _init_db(self) -> None:
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL mode (got {mode!r})")
            with _immediate(conn):
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(stmt)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"{self.path} has review schema version {version}; this traitloc reads up to {SCHEMA_VERSION}"
                    )

    def _write(self, fn: Callable[[sqlite3.Connection, str], None]) -> None:
        if self.readonly:
            raise PermissionError(f"{self.path} is open read-only")

        def tx() -> None:
            with self._connect() as conn, _immediate(conn):
                fn(conn, _utc_now())

        self._retry(tx)

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        if self.readonly and not self.path.exists():
            return []

        def q() -> list[tuple[object, ...]]:
            with self._connect() as conn:
                return conn.execute(sql, tuple(params)).fetchall()

        return self._retry(q)

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def journal_mode(self) -> str:
        """The database's journal mode (``wal``)."""
        return str(self._read("PRAGMA journal_mode")[0][0]).lower() if self.path.exists() else ""

    def set(self, result_id: str, status: str, note: str = "") -> Decision:
        """Record (or replace) the decision for ``result_id``; returns it as stored.

        Parameters
        ----------
        result_id : ``<image_key>/<slug>`` (see :func:`result_id_from_map`).
        status : one of :data:`STATUSES`.
        note : free text (at most 10,000 characters).
        """
        note = _checked_decision(result_id, status, note)
        stamp: list[str] = []

        def fn(conn: sqlite3.Connection, now: str) -> None:
            stamp[:] = [now]
            conn.execute(
                "INSERT INTO decisions(result_id, status, note, updated_utc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(result_id) DO UPDATE SET status = excluded.status, note = excluded.note, "
                "updated_utc = excluded.updated_utc",
                (result_id, status, note, now),
            )
            conn.execute(
                "INSERT INTO history(result_id, action, status, note, who, updated_utc) VALUES (?, 'set', ?, ?, ?, ?)",
                (result_id, status, note, self.who, now),
            )

        self._write(fn)
        return Decision(result_id, status, note, stamp[0])

    def clear(self, result_id: str) -> bool:
        """Remove the decision for ``result_id`` (logged in the history); ``True`` if there was one."""
        check_result_id(result_id)
        removed: list[bool] = []

        def fn(conn: sqlite3.Connection, now: str) -> None:
            cur = conn.execute("DELETE FROM decisions WHERE result_id = ?", (result_id,))
            removed[:] = [cur.rowcount > 0]
            if removed[0]:
                conn.execute(
                    "INSERT INTO history(result_id, action, status, note, who, updated_utc) "
                    "VALUES (?, 'clear', NULL, NULL, ?, ?)",
                    (result_id, self.who, now),
                )

        self._write(fn)
        return removed[0]

    def set_many(self, items: Sequence[tuple[str, str, str]]) -> int:
        """Record many decisions ``(result_id, status, note)`` in one transaction (a bulk decision); returns the count.

        All or nothing: every item is validated first, and the decisions and their history rows are written in one
        ``BEGIN IMMEDIATE`` transaction (one fsync for thousands of decisions, where :meth:`set` pays one each).
        """
        checked = []
        for result_id, status, note in items:
            checked.append((result_id, status, _checked_decision(result_id, status, note)))
        if not checked:
            return 0

        def fn(conn: sqlite3.Connection, now: str) -> None:
            conn.executemany(
                "INSERT INTO decisions(result_id, status, note, updated_utc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(result_id) DO UPDATE SET status = excluded.status, note = excluded.note, "
                "updated_utc = excluded.updated_utc",
                [(r, s, n, now) for r, s, n in checked],
            )
            conn.executemany(
                "INSERT INTO history(result_id, action, status, note, who, updated_utc) VALUES (?, 'set', ?, ?, ?, ?)",
                [(r, s, n, self.who, now) for r, s, n in checked],
            )

        self._write(fn)
        return len(checked)

    def clear_many(self, result_ids: Sequence[str]) -> int:
        """Remove the decisions of ``result_ids`` in one transaction (logged); returns how many there were."""
        ids = [check_result_id(r) for r in result_ids]
        removed: list[int] = [0]

        def fn(conn: sqlite3.Connection, now: str) -> None:
            n = 0
            for r in ids:
                cur = conn.execute("DELETE FROM decisions WHERE result_id = ?", (r,))
                if cur.rowcount > 0:
                    n += 1
                    conn.execute(
                        "INSERT INTO history(result_id, action, status, note, who, updated_utc) "
                        "VALUES (?, 'clear', NULL, NULL, ?, ?)",
                        (r, self.who, now),
                    )
            removed[0] = n

        if ids:
            self._write(fn)
        return removed[0]

    def reviewer_counts(self) -> dict[str, dict[str, int]]:
        """Current decisions per reviewer (the one who last set each) and status: ``{who: {status: n}}``."""
        rows = self._read(
            "SELECT h.who, d.status, COUNT(*) FROM decisions d JOIN history h ON h.seq = "
            "(SELECT MAX(seq) FROM history WHERE result_id = d.result_id) GROUP BY h.who, d.status"
        )
        out: dict[str, dict[str, int]] = {}
        for who, status, n in rows:
            out.setdefault(str(who), dict.fromkeys(STATUSES, 0))[str(status)] = int(n)  # type: ignore[call-overload]
        return out

    def get(self, result_id: str) -> Decision | None:
        """The current decision for ``result_id``, or ``None``."""
        check_result_id(result_id)
        rows = self._read(
            "SELECT result_id, status, note, updated_utc FROM decisions WHERE result_id = ?", (result_id,)
        )
        return Decision(*map(str, rows[0])) if rows else None

    def decisions(self, status: str | None = None) -> dict[str, Decision]:
        """All current decisions (``result_id -> Decision``), optionally only those with ``status``."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        sql = "SELECT result_id, status, note, updated_utc FROM decisions"
        rows = self._read(
            sql + (" WHERE status = ?" if status else "") + " ORDER BY result_id", (status,) if status else ()
        )
        return {str(r[0]): Decision(*map(str, r)) for r in rows}

    def accepted(self) -> list[str]:
        """Result ids whose decision is ``accepted``, sorted."""
        return list(self.decisions("accepted"))

    def history(self, result_id: str | None = None) -> list[HistoryEntry]:
        """The change log, oldest first (of one result, or of all)."""
        sql = "SELECT seq, result_id, action, status, note, who, updated_utc FROM history"
        if result_id is not None:
            check_result_id(result_id)
            rows = self._read(sql + " WHERE result_id = ? ORDER BY seq", (result_id,))
        else:
            rows = self._read(sql + " ORDER BY seq")
        return [
            HistoryEntry(int(cast(int, r[0])), str(r[1]), str(r[2]), _opt(r[3]), _opt(r[4]), str(r[5]), str(r[6]))
            for r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Number of decisions per status (every status present, 0 when none)."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._read("SELECT status, COUNT(*) FROM decisions GROUP BY status"):
            out[str(status)] = int(n)  # type: ignore[call-overload]
        return out

    def __repr__(self) -> str:
        return f"ReviewStore({str(self.root)!r}, who={self.who!r})"


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
