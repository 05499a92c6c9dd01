"""Raw records to Examples: JSON Lines / CSV files (plain or .gz), hub datasets, bad rows.

Every reader yields ``(where, row)`` pairs, ``where`` naming the file and the 1-based line
("data.jsonl line 7"), so that every problem can be reported at its row. A row that cannot be
parsed is yielded as a :class:`KMergeDataError` instead of a dict; :func:`convert_records`
then raises it, or counts and skips it when asked to (``skip_bad_rows``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import string
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kmerge.errors import KMergeDataError
from kmerge.tasks.base import Example, Task, sample

Row = dict | KMergeDataError
# File formats by name ending (after an optional .gz).
FILE_SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv",)}


def data_format(path: str | Path) -> str | None:
    """'jsonl' or 'csv' from the file name (optionally .gz); None for other files."""
    name = Path(path).name.lower().removesuffix(".gz")
    return next((fmt for fmt, ends in FILE_SUFFIXES.items() if name.endswith(ends)), None)


def file_format(path: str | Path) -> str:
    """Like :func:`data_format`, but an unknown file type is an error."""
    fmt = data_format(path)
    if fmt is None:
        raise KMergeDataError(
            f"{path}: unknown file type; expected .jsonl or .csv (optionally .gz)"
        )
    return fmt


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KMergeDataError(f"{path}: no such file") from None
    except (EOFError, OSError, zlib.error) as e:
        raise KMergeDataError(f"{path}: cannot read file ({e})") from e


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Row]]:
    """One JSON object per line; blank lines are skipped; a UTF-8 byte-order mark is allowed."""
    path = Path(path)
    for lineno, line in enumerate(_read_bytes(path).split(b"\n"), start=1):
        where = f"{path} line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, KMergeDataError(f"{where}: not valid UTF-8 (byte {e.start})")
            continue
        if lineno == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield where, KMergeDataError(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            kind = type(row).__name__
            yield where, KMergeDataError(f"{where}: row is a {kind}, not a JSON object")
            continue
        yield where, row


def read_csv(path: str | Path) -> Iterator[tuple[str, Row]]:
    """A header row, then one record per row (quoted fields may span lines)."""
    path = Path(path)
    # surrogateescape keeps undecodable bytes as lone surrogates, so that the bad row (not the
    # whole file) can be reported or skipped.
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fields = reader.fieldnames
    except csv.Error as e:
        raise KMergeDataError(f"{path} line 1: bad CSV header ({e})") from e
    if not fields:
        raise KMergeDataError(f"{path}: empty CSV file (no header row)")
    start = 2
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield (
                f"{path} line {reader.line_num}",
                KMergeDataError(f"{path} line {reader.line_num}: bad CSV ({e})"),
            )
            return  # the reader cannot recover its position after a parse error
        where, start = f"{path} line {start}", reader.line_num + 1
        if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
            yield where, KMergeDataError(f"{where}: not valid UTF-8")
        elif None in row:
            yield where, KMergeDataError(f"{where}: more fields than the header names")
        else:
            yield where, {k: v for k, v in row.items() if v is not None}


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def read_records(path: str | Path) -> Iterator[tuple[str, Row]]:
    """Rows of a JSON Lines or CSV file, by file name."""
    reader = read_jsonl if file_format(path) == "jsonl" else read_csv
    return reader(path)


def hub_records(
    repo_id: str, data_files: str, split: str = "train", streaming: bool = False
) -> Iterator[tuple[str, Row]]:
    """Rows of a dataset on the Hugging Face hub (or a local folder with the same layout).

    ``data_files`` selects the raw files inside the repository, so that datasets whose loading
    script newer ``datasets`` releases refuse (Amazon-Reviews-2023, commitpackft) still load.
    """
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, data_files=data_files, split=split, streaming=streaming)
    except Exception as e:  # network, missing files, bad layout: all end the same way for a user
        raise KMergeDataError(
            f"cannot load {repo_id} ({data_files}) with datasets: {type(e).__name__}: {e}. "
            "Without network access, pass local files with --data-dir."
        ) from e
    for i, row in enumerate(ds):
        yield f"{repo_id}/{data_files} row {i + 1}", dict(row)


@dataclass
class Converted:
    examples: list[Example]
    skipped: int  # bad rows skipped (only with skip_bad_rows)
    first_error: str | None  # the first skipped row's message, for the report


def convert_records(
    records: Iterable[tuple[str, Row]],
    convert: Callable[[Mapping], Example],
    skip_bad_rows: bool = False,
    source: str = "data",
) -> Converted:
    """Apply ``convert`` (which raises KMergeDataError for a bad row) to every row.

    A bad row raises, naming the row, unless ``skip_bad_rows``: then it is counted.
    """
    examples, skipped, first_error = [], 0, None
    for where, row in records:
        try:
            if isinstance(row, KMergeDataError):
                raise row
            try:
                example = convert(row)
            except KMergeDataError as e:
                raise KMergeDataError(f"{where}: {e}") from None
            example.meta["where"] = where  # for errors found later (a prompt too long)
            examples.append(example)
        except KMergeDataError as e:
            if not skip_bad_rows:
                raise
            skipped += 1
            first_error = first_error or str(e)
    if not examples:
        detail = f" ({skipped} bad rows skipped; first: {first_error})" if skipped else ""
        raise KMergeDataError(f"{source}: no examples{detail}")
    return Converted(examples, skipped, first_error)


def text_field(row: Mapping, key: str) -> str:
    """A required, non-empty string field."""
    if key not in row or row[key] is None:
        raise KMergeDataError(f'row has no "{key}" field')
    value = row[key]
    if not isinstance(value, str):
        raise KMergeDataError(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise KMergeDataError(f'"{key}" is empty')
    return value


def number_field(row: Mapping, key: str) -> float:
    """A required finite number (CSV cells are parsed)."""
    if key not in row or row[key] in (None, ""):
        raise KMergeDataError(f'row has no "{key}" field')
    value = row[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KMergeDataError(f'"{key}" must be a number, got {value!r}') from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise KMergeDataError(f'"{key}" must be a finite number, got {value!r}')
    return number


def format_template(template: str, row: Mapping) -> str:
    """``template.format_map(row)``, with a clear error for a field the row lacks or leaves
    empty (an empty review would otherwise become a valid-looking prompt)."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name and name in row and (row[name] is None or not str(row[name]).strip()):
            raise KMergeDataError(f'"{name}" is empty')
    try:
        text = template.format_map(row)
    except KeyError as e:
        raise KMergeDataError(f"row has no {e} field (named in the template)") from None
    except (ValueError, IndexError, AttributeError) as e:
        raise KMergeDataError(f"bad template {template!r}: {e}") from None
    if not text.strip():
        raise KMergeDataError("the template gives an empty prompt")
    return text


class RecordTask(Task):
    """A task read from records: local files per split, or one hub split cut by a stable hash.

    Subclasses set how a row becomes an Example (`convert`), which row field groups records
    that must stay on one side of the train/test cut (`split_key`, e.g. the product), and where
    the rows come from (`local_files`, `hub_rows`).
    """

    split_key: str | None = None

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        skip_bad_rows: bool = False,
        test_fraction: float = 0.1,
    ) -> None:
        if not 0 < test_fraction < 1:
            raise KMergeDataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise KMergeDataError(f"data directory {data_dir} does not exist")
        self.data_dir = data_dir
        self.seed = seed
        self.skip_bad_rows = skip_bad_rows
        self.test_fraction = test_fraction
        self._cache: dict[str, list[Example]] = {}

    # -- to implement
    def convert(self, row: Mapping) -> Example:
        raise NotImplementedError

    def hub_rows(self) -> Iterable[tuple[str, Row]]:
        raise NotImplementedError(f"task {self.name!r} has no hub source; pass data_dir")

    def local_file(self, split: str) -> Path | None:
        """The file for ``split`` in ``data_dir``: the one JSON Lines/CSV file whose name
        contains the split's name (None when there is none: the train file is then cut)."""
        if self.data_dir is None:
            return None
        found = sorted(
            p
            for p in Path(self.data_dir).iterdir()
            if split in p.name and data_format(p) is not None
        )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise KMergeDataError(f"{self.data_dir}: several {split} files ({names})")
        return found[0] if found else None

    # -- shared machinery
    def _examples(self, split: str, n: int | None) -> list[Example]:
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return sample(self._cache[split], n, self.seed)

    def _load(self, split: str) -> list[Example]:
        path = self.local_file(split)
        if path is not None:
            rows, source = read_records(path), str(path)
        elif self.data_dir is not None:
            train = self.local_file("train")
            if train is None:
                raise KMergeDataError(f"{self.data_dir}: no train file (*train*.jsonl or .csv)")
            rows, source = self._cut(read_records(train), split), f"{train} ({split} cut)"
        else:
            rows, source = self._cut(self.hub_rows(), split), f"{self.name} hub ({split} cut)"
        converted = convert_records(rows, self.convert, self.skip_bad_rows, source)
        self.skipped_rows += converted.skipped
        return converted.examples

    def _cut(self, rows: Iterable[tuple[str, Row]], split: str) -> Iterator[tuple[str, Row]]:
        """Deterministic train/test cut by a hash of ``split_key`` (or of the row's text)."""
        for where, row in rows:
            if isinstance(row, KMergeDataError):
                yield where, row
                continue
            key = str(row.get(self.split_key, "")) if self.split_key else ""
            key = key or json.dumps(row, sort_keys=True, default=str)
            in_test = zlib.crc32(key.encode("utf-8", "surrogatepass")) % 10_000 < (
                self.test_fraction * 10_000
            )
            if in_test == (split == "test"):
                yield where, row
