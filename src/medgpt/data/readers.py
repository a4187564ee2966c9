"""Read files, folders, globs or hub datasets into canonical records, lazily, with errors as file:line: field."""

from __future__ import annotations

import glob as globlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medgpt.data.formats import FORMAT_KIND, PARSERS, RecordError, detect_format
from medgpt.data.records import KINDS, DataError, InvalidDataError, Record, Source

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".txt", ".json", ".jsonl")
FORMATS = ("auto", *PARSERS)


@dataclass(frozen=True)
class ReadOptions:
    data_format: str = "auto"
    text_separator: str = "line"  # "line" | "blank_line"
    keep_linebreaks: bool = True

    def __post_init__(self):
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format '{self.data_format}' is not one of {', '.join(FORMATS)}")
        if self.text_separator not in ("line", "blank_line"):
            raise ValueError(f"text_separator '{self.text_separator}' is not one of line, blank_line")

    @classmethod
    def from_args(cls, data_args) -> "ReadOptions":
        return cls(data_args.data_format, data_args.text_separator, data_args.keep_linebreaks)


def resolve_files(spec: str | Path) -> list[Path]:
    """A file, a folder (recursive, data files only, sorted) or a glob -> the files it names."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no {', '.join(DATA_SUFFIXES)} files")
        return files
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"{text}: the pattern matches no files")
        return files
    raise FileNotFoundError(f"{text}: no such file, folder or pattern")


def resolve_many(specs: str | Iterable[str]) -> list[Path]:
    """Comma-separated or listed specs -> files (each once, in order)."""
    if isinstance(specs, (str, Path)):
        specs = [s.strip() for s in str(specs).split(",") if s.strip()]
    seen: dict[Path, None] = {}
    for spec in specs:
        for path in resolve_files(spec):
            seen.setdefault(path, None)
    return list(seen)


# ------------------------------------------------------------------------------------------- raw items


def _decode(raw: bytes, source: Source) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(
            source, "encoding",
            f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); re-save the file as UTF-8, "
            "e.g. `iconv -f GBK -t UTF-8 in.txt > out.txt`",
        )


def _lines(path: Path) -> Iterator[tuple[Source, str | DataError]]:
    """Decoded lines without their line ending; BOM removed; read in binary so one bad line names itself."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            source = Source(str(path), number)
            yield source, _decode(raw.rstrip(b"\r\n").rstrip(b"\r"), source)


def _text_items(path: Path, options: ReadOptions) -> Iterator[tuple[Source, Any]]:
    if options.text_separator == "line":
        for source, line in _lines(path):
            if isinstance(line, DataError) or line.strip():
                yield source, line if isinstance(line, DataError) else line.strip()
        return
    paragraph: list[str] = []
    start = None
    joiner = "\n" if options.keep_linebreaks else " "
    for source, line in _lines(path):
        if isinstance(line, DataError):
            yield source, line
        elif line.strip():
            start = start or source
            paragraph.append(line.strip())
        elif paragraph:
            yield start, joiner.join(paragraph)
            paragraph, start = [], None
    if paragraph:
        yield start, joiner.join(paragraph)


def _json_items(path: Path) -> Iterator[tuple[Source, Any]]:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):  # a JSON array file
        text = _decode(path.read_bytes().lstrip(b"\xef\xbb\xbf"), Source(str(path), 1))
        if isinstance(text, DataError):
            yield text.source, text
            return
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            source = Source(str(path), err.lineno)
            yield source, DataError(source, "json", f"not valid JSON: {err.msg} (column {err.colno})")
            return
        for index, item in enumerate(items, start=1):
            yield Source(str(path), index, "item"), item
        return
    for source, line in _lines(path):
        if isinstance(line, DataError):
            yield source, line
        elif line.strip():
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as err:
                yield source, DataError(source, "json", f"not valid JSON: {err.msg} (column {err.colno})")


def raw_items(path: Path, options: ReadOptions) -> Iterator[tuple[Source, Any]]:
    if path.suffix.lower() == ".txt":
        return _text_items(path, options)
    if path.suffix.lower() in (".json", ".jsonl"):
        return _json_items(path)
    return iter([(Source(str(path), 0), DataError(Source(str(path), 0), "file",
                                                  f"unsupported file type '{path.suffix}' (use .txt, .json or .jsonl)"))])


# ------------------------------------------------------------------------------------------- records


class RecordReader:
    """Iterates Record | DataError from (source, raw item) pairs; detects the format from the first good item."""

    def __init__(self, items: Iterable[tuple[Source, Any]], options: ReadOptions, text_file: bool = False):
        self.items = items
        self.text_file = text_file
        self.format = "text" if text_file else (None if options.data_format == "auto" else options.data_format)

    def __iter__(self) -> Iterator[Record | DataError]:
        for source, item in self.items:
            if isinstance(item, DataError):
                yield item
                continue
            try:
                if not (self.text_file or isinstance(item, dict) or (self.format == "text" and isinstance(item, str))):
                    raise RecordError("record", f"expected a JSON object, got {type(item).__name__}")
                if self.format is None:
                    self.format = detect_format(item)
                yield PARSERS[self.format](item, source)
            except RecordError as err:
                yield DataError(source, err.field, err.problem)

    @property
    def kind(self) -> str | None:
        return FORMAT_KIND.get(self.format) if self.format else None


def file_reader(path: Path, options: ReadOptions) -> RecordReader:
    return RecordReader(raw_items(path, options), options, text_file=path.suffix.lower() == ".txt")


def hub_reader(name: str, config_name: str | None, split: str, options: ReadOptions, streaming: bool,
               cache_dir: str | None = None) -> RecordReader:
    """Rows of a hub (or local script/parquet) dataset via `datasets.load_dataset`."""
    from datasets import load_dataset

    rows = load_dataset(name, config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    items = ((Source(name, i, "row"), dict(row)) for i, row in enumerate(rows, start=1))
    return RecordReader(items, options)


@dataclass
class ReadResult:
    """Records of one kind from one or more sources, with the errors met and per-file formats."""

    records: list[Record] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # source path -> detected format
    counts: dict[str, int] = field(default_factory=dict)  # source path -> good records


def check_kind(reader: RecordReader, name: str, kinds: tuple[str, ...]) -> DataError | None:
    if reader.kind and kinds and reader.kind not in kinds:
        wanted = " or ".join(kinds)
        return DataError(Source(name, 0), "format",
                         f"holds {reader.format} ({reader.kind}) records, but {wanted} records are needed here")
    return None


def read_records(specs: str | Iterable[str], kinds: tuple[str, ...] = (), options: ReadOptions = ReadOptions(),
                 skip_invalid: bool = False, limit: int | None = None) -> ReadResult:
    """Read every file named by `specs`; raise InvalidDataError on bad records unless skip_invalid."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown record kind '{kind}'")
    result = ReadResult()
    for path in resolve_many(specs):
        reader = file_reader(path, options)
        collect(reader, str(path), kinds, result)
        if limit is not None and len(result.records) >= limit:
            result.records = result.records[:limit]
            break
    return finish(result, skip_invalid)


def collect(reader: RecordReader, name: str, kinds: tuple[str, ...], result: ReadResult) -> None:
    good = 0
    for item in reader:
        if isinstance(item, DataError):
            result.errors.append(item)
            continue
        wrong = check_kind(reader, name, kinds)
        if wrong:
            result.errors.append(wrong)
            break
        result.records.append(item)
        good += 1
    result.formats[name] = reader.format or "unknown"
    result.counts[name] = good


def finish(result: ReadResult, skip_invalid: bool) -> ReadResult:
    if result.errors:
        if not skip_invalid or any(e.field == "format" for e in result.errors):
            raise InvalidDataError(result.errors)
        logger.warning("skipped %d invalid record(s) (skip_invalid_records: true); first: %s",
                       len(result.errors), result.errors[0])
    if not result.records:
        raise InvalidDataError([DataError(Source("data", 0), "records", "no usable records")])
    return result
