"""Read files, folders, globs or hub datasets into canonical records, lazily, with errors as file:line: field."""

from __future__ import annotations

import glob as globlib
import json
import logging
from collections import Counter
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
    keep_linebreaks: bool = True  # blank_line: a paragraph's lines stay joined by line breaks
    line_endings: bool = False  # line: each document keeps the line break that ended it (training's keep_linebreaks)

    def __post_init__(self):
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format '{self.data_format}' is not one of {', '.join(FORMATS)}")
        if self.text_separator not in ("line", "blank_line"):
            raise ValueError(f"text_separator '{self.text_separator}' is not one of line, blank_line")

    @classmethod
    def from_args(cls, data_args) -> "ReadOptions":
        # MedicalGPT's keep_linebreaks means both (datasets' `text` loader keeps each line's break)
        return cls(data_args.data_format, data_args.text_separator, data_args.keep_linebreaks,
                   line_endings=data_args.keep_linebreaks)


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
    for source, line, _ in _lines_and_endings(path):
        yield source, line


def _lines_and_endings(path: Path) -> Iterator[tuple[Source, str | DataError, bool]]:
    """`_lines`, and whether each line ended with a line break (the last line of a file may not)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            source = Source(str(path), number)
            yield source, _decode(raw.rstrip(b"\r\n").rstrip(b"\r"), source), raw.endswith((b"\n", b"\r"))


def _text_items(path: Path, options: ReadOptions) -> Iterator[tuple[Source, Any]]:
    """Documents of a .txt file. Training follows MedicalGPT's keep_linebreaks (datasets' `text` loader, one
    sample per line with `keepends`): with `line_endings` a `line` document keeps the line break that ended it;
    with `keep_linebreaks` `blank_line` paragraphs keep the breaks between their lines."""
    if options.text_separator == "line":
        for source, line, ended in _lines_and_endings(path):
            if isinstance(line, DataError):
                yield source, line
            elif line.strip():
                yield source, line.strip() + ("\n" if options.line_endings and ended else "")
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
    """Iterates Record | DataError from (source, raw item) pairs. With data_format auto each record's format is
    told by its own keys, so a file that concatenates ShareGPT, OpenAI and Alpaca rows reads record by record;
    a forced data_format parses every record as that format."""

    def __init__(self, items: Iterable[tuple[Source, Any]], options: ReadOptions, text_file: bool = False):
        self.items = items
        self.text_file = text_file
        self.forced = "text" if text_file else (None if options.data_format == "auto" else options.data_format)
        self.formats: Counter = Counter()  # format -> records read in it (parsed or not)

    def __iter__(self) -> Iterator[Record | DataError]:
        for source, item in self.items:
            if isinstance(item, DataError):
                yield item
                continue
            try:
                yield self._parse(item, source)
            except RecordError as err:
                yield DataError(source, err.field, err.problem)

    def _parse(self, item: Any, source: Source) -> Record:
        if not (self.text_file or isinstance(item, dict) or (self.forced == "text" and isinstance(item, str))):
            raise RecordError("record", f"expected a JSON object, got {type(item).__name__}")
        name = self.forced or detect_format(item)
        self.formats[name] += 1
        try:
            return PARSERS[name](item, source)
        except RecordError as err:
            own = _own_format(item) if self.forced and not self.text_file else None
            if own and own != name:
                raise RecordError(err.field, f"{err.problem} (data_format is {name}, but this record's keys are "
                                             f"{own}'s: use data_format: auto to read each record as its own "
                                             "format)") from None
            raise

    @property
    def format(self) -> str | None:
        """The format of the records read, `a+b` when they mixed formats, None before any."""
        return "+".join(sorted(self.formats)) if self.formats else None

    def kind_of(self, record: Record) -> str:
        return next(kind for kind, cls in KINDS.items() if isinstance(record, cls))


def _own_format(item: Any) -> str | None:
    try:
        return detect_format(item)
    except RecordError:
        return None


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


def check_kind(record: Record, source: Source, name: str, reader: RecordReader, kinds: tuple[str, ...]) -> DataError | None:
    """A record of a kind the caller cannot use: one error for the file (reading it stops there)."""
    kind = reader.kind_of(record)
    if kinds and kind not in kinds:
        wanted = " or ".join(kinds)
        where = "" if source.line <= 1 else f" (from {source})"
        return DataError(Source(name, 0), "format", f"holds {_format_name(record, reader)} ({kind}) records{where}, "
                                                    f"but {wanted} records are needed here")
    return None


def _format_name(record: Record, reader: RecordReader) -> str:
    formats = [f for f in reader.formats if FORMAT_KIND[f] == reader.kind_of(record)]
    return "/".join(formats) or reader.kind_of(record)


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
    """Read one source into `result`; a source without a single valid record is an error of its own."""
    good, bad, stopped = 0, 0, False
    for item in reader:
        if isinstance(item, DataError):
            result.errors.append(item)
            bad += 1
            continue
        wrong = check_kind(item, item.source, name, reader, kinds)
        if wrong:
            result.errors.append(wrong)
            stopped = True
            break
        result.records.append(item)
        good += 1
    if not good and not stopped:
        result.errors.append(no_records_error(name, bad))
    result.formats[name] = reader.format or "unknown"
    result.counts[name] = good


def no_records_error(name: str, invalid: int) -> DataError:
    problem = (f"no valid record: all {invalid} failed validation (see above)" if invalid
               else "no records: the file is empty (or holds only blank lines)")
    return DataError(Source(name, 0), "records", problem)


# Errors about a whole source, not one record: skip_invalid_records cannot drop them.
SOURCE_ERRORS = ("format", "records")


def finish(result: ReadResult, skip_invalid: bool) -> ReadResult:
    if result.errors:
        if not skip_invalid or any(e.field in SOURCE_ERRORS and e.source.line == 0 for e in result.errors):
            raise InvalidDataError(result.errors)
        logger.warning("skipped %d invalid record(s) (skip_invalid_records: true); first: %s",
                       len(result.errors), result.errors[0])
    if not result.records:
        raise InvalidDataError([DataError(Source("data", 0), "records", "no usable records")])
    return result
