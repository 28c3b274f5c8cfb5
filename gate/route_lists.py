"""Route conditions read from list files (``dst_from``, ``host_from``): one entry per line, ``#`` comments
and blank lines, the form country address blocks and ad-block or site lists are published in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["MAX_LIST_BYTES", "MAX_LIST_ENTRIES", "ListProblems", "read_list", "resolve"]

T = TypeVar("T")

# A file is read whole before it is parsed. The largest lists meant for this (a full ad-block host list,
# ~1M names of ~25 bytes) stay under 32 MiB; a bigger file is more likely the wrong file than a list.
MAX_LIST_BYTES = 32 * 1024 * 1024
# Entries per file: every entry costs ~200 bytes in the route and its index, and each is validated at
# load (~2 us), so a million is about 200 MiB and 2 s at start: the most a home router can afford.
MAX_LIST_ENTRIES = 1_000_000
MAX_PROBLEMS = 10  # located problems reported per file (then a count): a wrong file is wrong on every line


class ListProblems(ValueError):
    """Every problem of a list file, each located as FILE:LINE (at most MAX_PROBLEMS, then a count)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def resolve(name: str, base: Path | None) -> Path:
    """A list's path as written, relative to the config file's directory (``base``), else the cwd."""
    path = Path(name)
    return path if path.is_absolute() or base is None else base / path


def read_list(path: Path, entry: Callable[[str], T], shown: str | None = None) -> tuple[T, ...]:
    """The entries of ``path``, each converted by ``entry`` (which raises ValueError for a bad one).

    ``shown`` is how problems name the file (as the config wrote it); ListProblems carries them all."""
    label = shown or str(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_LIST_BYTES + 1)
    except OSError as e:
        raise ListProblems([f"{label}: {e.strerror or e}"]) from None
    if len(data) > MAX_LIST_BYTES:
        raise ListProblems([f"{label}: over {MAX_LIST_BYTES // (1024 * 1024)} MiB (MAX_LIST_BYTES); is this a list "
                            "of one entry per line?"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ListProblems([f"{label}:{line}: not UTF-8"]) from None
    found: list[T] = []
    problems: list[str] = []
    bad = 0
    for number, raw in enumerate(text.split("\n"), 1):  # not splitlines: \f or U+2028 would shift the numbers
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        if len(found) >= MAX_LIST_ENTRIES:
            raise ListProblems([f"{label}:{number}: more than {MAX_LIST_ENTRIES:,} entries (MAX_LIST_ENTRIES)"])
        try:
            found.append(entry(item))
        except ValueError as e:
            bad += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"{label}:{number}: {e}")
    if bad > len(problems):
        problems.append(f"{label}: {bad - len(problems):,} more bad lines")
    if problems:
        raise ListProblems(problems)
    return tuple(found)
