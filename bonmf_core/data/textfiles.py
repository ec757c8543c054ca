"""Text files as the lenient readers take them: decoded strictly, split into records with the
line each one starts on, and every line that does not parse kept as a finding.

A row is never dropped without a word: `Records.malformed` names the file, the line and what
is wrong, and the data checks turn it into a blocking finding (`checks.max_malformed_lines`).
"""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from bonmf_core.errors import DataError

MAX_REPORTED = 20   # malformed lines kept as examples per file; all of them are counted


def read_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError("required file is missing", path=path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e}", path=path) from None


def decode_text(data: bytes, path: Path, encoding: str) -> str:
    """`data` as text: a UTF-8 BOM dropped, CRLF and CR made LF.

    encoding "auto" (MovieLens' .dat files) is UTF-8 when the file is UTF-8, else ISO-8859-1,
    which GroupLens ships — but a file that is UTF-8 up to some line and not after it is a
    mixed file, refused rather than read as mojibake. Bytes that are not `encoding` raise a
    DataError naming the file, the byte offset and the line.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise DataError(f"NUL byte at byte offset {offset}: the file is binary or UTF-16, not "
                        "text (save it as UTF-8)", path=path, line=_line_at(data, offset))
    if encoding == "auto":
        encoding = guess_encoding(data)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"bytes {data[e.start:e.end]!r} at byte offset {e.start} are not valid "
                        f"{encoding} (save the file as {encoding}, or declare its encoding)",
                        path=path, line=_line_at(data, e.start)) from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}", path=path, field="encoding") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def guess_encoding(data: bytes) -> str:
    """'utf-8' when the file is (or tries to be) UTF-8, else 'iso-8859-1'."""
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as e:
        if any(b >= 0x80 for b in data[:e.start]):   # valid UTF-8 text before the bad byte
            return "utf-8"                           # → decode again and name that byte
        return "iso-8859-1"


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


@dataclass
class Records:
    """Parsed rows (lists of strings), the file line each starts on, and the lines that did
    not parse as {"line", "problem"} (the first MAX_REPORTED; `n_malformed` counts all)."""

    file: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    malformed: list[dict] = field(default_factory=list)
    n_malformed: int = 0

    def reject(self, line: int, problem: str) -> None:
        self.n_malformed += 1
        if len(self.malformed) < MAX_REPORTED:
            self.malformed.append({"line": line, "problem": problem})

    def problems(self) -> dict:
        """What `RawTables.problems` keeps for this file (empty when every line parsed)."""
        if not self.n_malformed:
            return {}
        return {self.file: {"malformed_lines": self.n_malformed, "examples": self.malformed}}


def split_dat(text: str, names: tuple[str, ...], file: str) -> Records:
    """'::'-separated lines (MovieLens), no header; a wrong field count is a malformed line."""
    records = Records(file, list(names))
    n = len(names)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) == n:
            records.rows.append(parts)
            records.lines.append(number)
        else:
            records.reject(number, f"expected {n} '::'-separated fields, found {len(parts)}: "
                                   f"{line[:60]!r}")
    return records


def split_csv(text: str, path: Path, delimiter: str = ",") -> Records:
    """A CSV (or TSV) with a header line; rows whose field count differs from the header's
    are malformed lines. Quoted cells may span lines: a row is named by its first line."""
    # the csv module refuses cells over 128 KiB; a whole file is the only sane bound here (a
    # 1 MB synopsis is odd, not malformed)
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    # TSV has no quoting convention (IANA text/tab-separated-values): quotes there are data
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("file is empty", path=path) from None
    records = Records(path.name, [h.strip() for h in header])
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:   # e.g. an unterminated quote: the rest cannot be trusted
            records.reject(start, f"does not parse as CSV: {e}")
            break
        if row and any(cell.strip() for cell in row):
            if len(row) == len(header):
                records.rows.append(row)
                records.lines.append(start)
            else:
                records.reject(start, f"expected {len(header)} fields (as the header), found "
                                      f"{len(row)}")
        start = reader.line_num + 1
    return records
