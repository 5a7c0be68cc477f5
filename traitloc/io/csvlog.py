"""A CSV results table for long, resumable batch runs.

``results.csv`` is written one batch of rows at a time; each :meth:`ResultsTable.append` is flushed and fsynced
before it returns, so a run killed between appends loses nothing it had committed, and a rerun into the same
output folder skips the finished rows (:meth:`ResultsTable.done_keys`). A run killed *during* an append leaves at
most one partial last line; it is ignored on load and cut off before the next append. A row written again
(a retried image) replaces the earlier one: the last row for a key wins. :meth:`ResultsTable.rewrite` compacts
the file atomically.

Every row is one line: newlines inside values are written as spaces, which keeps the "partial last line" rule
exact and the file easy to ``grep``. One process writes a table at a time.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from traitloc.io.files import atomic_write, fsync_dir

__all__ = ["ResultsTable"]

PathLike = str | os.PathLike[str]
Key = tuple[str, ...]

_TAIL_CHUNK = 1 << 16


def _check_names(name: str, values: object) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of column names, got {type(values).__name__}")
    names = tuple(values)
    if not names:
        raise ValueError(f"{name} must not be empty")
    for column in names:
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {column!r}")
        if "\n" in column or "\r" in column:
            raise ValueError(f"{name} must not contain newlines, got {column!r}")
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise ValueError(f"{name} has duplicate names: {', '.join(duplicates)}")
    return names


def _format_value(value: object) -> str:
    """The text stored for a value: ``None`` is empty, newlines become spaces, the rest is ``str(value)``."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return text


def _complete_length(path: Path) -> tuple[int, int]:
    """Return ``(size, length of the part that ends with the last newline)`` of a file, reading from its end."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            handle.seek(start)
            chunk = handle.read(end - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                return size, start + index + 1
            end = start
    return size, 0


class ResultsTable:
    """CSV table of per-item results, appended durably and resumable after a kill.

    Parameters
    ----------
    path : path
        The CSV file. It need not exist; it (and its folder) is created by the first :meth:`append` or
        :meth:`rewrite`.
    columns : sequence of str
        Columns every row must provide. An existing file must have them all (in any order); it may have more
        (extra columns are kept, and rows may fill them).
    key_columns : sequence of str
        Subset of ``columns`` that identifies a row, e.g. ``("image_key", "concept")``.

    Attributes
    ----------
    header : tuple of str
        The file's columns: the existing header, or ``columns`` for a new file.
    dropped_partial_line : bool
        Whether the file ended with a partial line (a run killed mid-append) that was ignored.
    duplicates : int
        Rows on file superseded by a later row with the same key.

    Raises
    ------
    ValueError
        If the arguments are inconsistent, or an existing file lacks required columns or has malformed lines.

    Examples
    --------
    >>> columns = ["image", "concept", "status"]
    >>> table = ResultsTable(out / "results.csv", columns, ["image", "concept"])  # doctest: +SKIP
    >>> todo = [job for job in jobs if table.key_of(job) not in table.done_keys()]  # doctest: +SKIP
    >>> table.append([{"image": "a.jpg", "concept": "red wing", "status": "ok"}])  # doctest: +SKIP
    """

    def __init__(self, path: PathLike, columns: Sequence[str], key_columns: Sequence[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = Path(path)
        self.columns = _check_names("columns", columns)
        self.key_columns = _check_names("key_columns", key_columns)
        unknown = [c for c in self.key_columns if c not in self.columns]
        if unknown:
            raise ValueError(f"key_columns not in columns: {', '.join(unknown)}")
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"results table path is not a file: {self.path}")
        self.header: tuple[str, ...] = self.columns
        self.dropped_partial_line = False
        self.duplicates = 0
        self._rows: dict[Key, dict[str, str]] = {}
        self._load()

    # ---------------------------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        size, complete = _complete_length(self.path)
        self.dropped_partial_line = complete < size
        with open(self.path, "rb") as handle:
            raw = handle.read(complete)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"results table {self.path} is not UTF-8 text ({exc})") from None
        records = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = next(records, None)
            if header is None:  # empty file, or only a partial header line
                return
            header_names = _check_names(f"header of {self.path}", header)
            missing = [c for c in self.columns if c not in header_names]
            if missing:
                raise ValueError(
                    f"results table {self.path} lacks columns {', '.join(missing)} (it has {', '.join(header)}); "
                    "use a new output folder or remove the file"
                )
            self.header = header_names
            width = len(header_names)
            for record in records:
                if not record:
                    continue
                if len(record) != width:
                    raise ValueError(
                        f"results table {self.path}, line {records.line_num}: {len(record)} fields, expected {width}"
                    )
                self._store(dict(zip(header_names, record, strict=True)))
        except csv.Error as exc:
            raise ValueError(f"results table {self.path}, line {records.line_num}: malformed CSV ({exc})") from None

    def _store(self, row: dict[str, str]) -> None:
        key = tuple(row[c] for c in self.key_columns)
        if key in self._rows:
            self.duplicates += 1
            del self._rows[key]  # the last write wins and moves to the end
        self._rows[key] = row

    def key_of(self, row: Mapping[str, object]) -> Key:
        """The key of a row as stored: its key columns formatted as in the file.

        Parameters
        ----------
        row : mapping
            Must hold every key column.

        Returns
        -------
        tuple of str
        """
        if not isinstance(row, Mapping):
            raise TypeError(f"row must be a mapping, got {type(row).__name__}")
        missing = [c for c in self.key_columns if c not in row]
        if missing:
            raise ValueError(f"row lacks key columns: {', '.join(missing)}")
        return tuple(_format_value(row[c]) for c in self.key_columns)

    def done_keys(self, status: str | None = "ok") -> set[Key]:
        """Keys of the rows whose (latest) ``status`` equals ``status``; all keys when ``status`` is None.

        Parameters
        ----------
        status : str or None, default "ok"

        Returns
        -------
        set of tuple of str
            Compare with :meth:`key_of`.
        """
        if status is None:
            return set(self._rows)
        if not isinstance(status, str):
            raise TypeError(f"status must be a str or None, got {type(status).__name__}")
        if "status" not in self.header:
            raise ValueError(f"results table {self.path} has no 'status' column")
        return {key for key, row in self._rows.items() if row["status"] == status}

    def rows(self) -> list[dict[str, str]]:
        """The current rows (one per key, the latest), as dicts of strings in file order."""
        return [dict(row) for row in self._rows.values()]

    def get(self, key: Key) -> dict[str, str] | None:
        """The latest row for ``key`` (see :meth:`key_of`), or None."""
        row = self._rows.get(tuple(key))
        return dict(row) if row is not None else None

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ResultsTable({str(self.path)!r}, rows={len(self)}, key_columns={list(self.key_columns)})"

    # ---------------------------------------------------------------------------------------------------------
    # writing
    # ---------------------------------------------------------------------------------------------------------
    def _prepare(self, rows: object) -> list[dict[str, str]]:
        if isinstance(rows, Mapping):
            raise TypeError("rows must be a list of dicts, got a single mapping (wrap it in a list)")
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
            raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
        known = set(self.header)
        prepared = []
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"row {index} must be a mapping, got {type(row).__name__}")
            unknown = [str(c) for c in row if c not in known]
            if unknown:
                raise ValueError(
                    f"row {index} has unknown columns {', '.join(unknown)} (table columns: {', '.join(self.header)})"
                )
            missing = [c for c in self.columns if c not in row]
            if missing:
                raise ValueError(f"row {index} lacks columns: {', '.join(missing)}")
            formatted = {c: _format_value(row.get(c)) for c in self.header}
            empty = [c for c in self.key_columns if not formatted[c]]
            if empty:
                raise ValueError(f"row {index} has empty key columns: {', '.join(empty)}")
            prepared.append(formatted)
        return prepared

    def _encode(self, rows: Iterable[dict[str, str]], header: bool) -> bytes:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        if header:
            writer.writerow(self.header)
        for row in rows:
            writer.writerow([row[c] for c in self.header])
        return buffer.getvalue().encode("utf-8")

    def append(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append rows and make them durable (flush + fsync) before returning.

        All rows are validated before anything is written. Values are stored as text (:class:`str`; ``None`` as
        empty; newlines as spaces). A partial last line left by a killed run is cut off first.

        Parameters
        ----------
        rows : list of mapping
            Each provides every column of ``columns``; may set extra columns of the file; no unknown columns.

        Raises
        ------
        ValueError, TypeError
            If a row is malformed; nothing is written then.
        """
        prepared = self._prepare(rows)
        if not prepared:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab+") as handle:
            size, complete = _complete_length(self.path) if not created else (0, 0)
            if complete < size:
                handle.truncate(complete)  # drop a partial line from a killed run
            handle.seek(0, os.SEEK_END)
            handle.write(self._encode(prepared, header=complete == 0))
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_dir(self.path.parent)
        for row in prepared:
            self._store(row)

    def rewrite(self) -> None:
        """Rewrite the file atomically with one row per key (the latest), dropping partial lines.

        Also creates the file (header only) when there are no rows yet.
        """
        atomic_write(self.path, self._encode(self._rows.values(), header=True))
        self.dropped_partial_line = False
        self.duplicates = 0
