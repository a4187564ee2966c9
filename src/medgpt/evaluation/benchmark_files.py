"""Rows of a benchmark as it is downloaded: a `.csv`, `.json` (an array, a JSON-lines file named .json, or an
object keyed by id as PubMedQA's `ori_pqal.json`), `.jsonl` or `.parquet` file, a folder of them, or a dataset
through `datasets.load_dataset` (a hub name, or a local dataset folder when a split is asked for). Each row comes
with its Source (file:line, file:item N, file:PMID …) and the file's stem, which is the subject for MMLU's and
CMMLU's one-file-per-subject layouts."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medgpt.data.records import DataError, Source

SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
# MMLU's original CSVs (hendrycks/test data/{dev,test,val}/SUBJECT_test.csv) have no header row.
MMLU_CSV_COLUMNS = ("question", "A", "B", "C", "D", "answer")
MMLU_CSV_SUFFIXES = ("_test", "_dev", "_val")


@dataclass
class Row:
    source: Source
    values: dict[str, Any] | DataError
    subject: str | None = None  # from the file name, for files that hold one subject


def benchmark_rows(spec: str, split: str | None = None, subset: str | None = None) -> Iterator[Row]:
    """Every row `spec` names, in order."""
    path = Path(spec).expanduser()
    if path.is_file():
        yield from file_rows(path)
    elif path.is_dir() and split is None:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: the folder holds no {', '.join(SUFFIXES)} files")
        for file in files:
            yield from file_rows(file)
    else:  # a hub name, or a local dataset folder laid out by split
        yield from dataset_rows(spec, split or "test", subset)


def file_rows(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    subject = path.stem
    if suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, values in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield Row(Source(str(path), number, "row"), values, subject)
    elif suffix in (".json", ".jsonl"):
        yield from _json_rows(path)
    else:
        source = Source(str(path), 0)
        yield Row(source, DataError(source, "file", f"unsupported file type '{suffix}' (use {', '.join(SUFFIXES)})"))


def dataset_rows(name: str, split: str, subset: str | None) -> Iterator[Row]:
    from datasets import load_dataset

    rows = load_dataset(name, subset, split=split)
    for number, values in enumerate(rows, start=1):
        yield Row(Source(f"{name}[{split}]", number, "row"), dict(values), subset)


def _text(path: Path) -> str | DataError:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return DataError(Source(str(path), raw[: err.start].count(b"\n") + 1), "encoding",
                         "not UTF-8; re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.csv > out.csv`)")


def _csv_rows(path: Path) -> Iterator[Row]:
    text = _text(path)
    if isinstance(text, DataError):
        yield Row(text.source, text)
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    subject = path.stem
    if _headerless_mmlu(path, header):
        columns = list(MMLU_CSV_COLUMNS)
        subject = next((subject[: -len(s)] for s in MMLU_CSV_SUFFIXES if subject.endswith(s)), subject)
        yield Row(Source(str(path), 1), dict(zip(columns, header)), subject)
    else:
        columns = [c.strip() for c in header]
    start = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
    for cells in reader:
        source, start = Source(str(path), start), reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            yield Row(source, DataError(source, "columns", f"{len(cells)} fields where the header has {len(columns)}"))
            continue
        yield Row(source, dict(zip(columns, cells)), subject)


def _headerless_mmlu(path: Path, header: list[str]) -> bool:
    """hendrycks/test's files: six fields, no column names, the last a letter."""
    return len(header) == 6 and header[-1].strip() in "ABCD" and \
        not {"question", "Question", "answer", "Answer"} & {h.strip() for h in header}


def _json_rows(path: Path) -> Iterator[Row]:
    text = _text(path)
    if isinstance(text, DataError):
        yield Row(text.source, text)
        return
    head = text.lstrip()[:1]
    whole = None
    if head in ("[", "{") and path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines saved as .json (MedMCQA's original dev.json is one)
    if isinstance(whole, list):
        for number, values in enumerate(whole, start=1):
            yield Row(Source(str(path), number, "item"), values if isinstance(values, dict) else
                      DataError(Source(str(path), number, "item"), "record", "expected a JSON object"))
        return
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        for number, (key, values) in enumerate(whole.items(), start=1):  # keyed by id (PubMedQA: by PMID)
            source = Source(str(path), int(key), "id") if key.isdigit() else Source(str(path), number, "item")
            yield Row(source, {"_key": key, **values})
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = Source(str(path), number)
        try:
            values = json.loads(line)
        except json.JSONDecodeError as err:
            yield Row(source, DataError(source, "json", f"not valid JSON: {err.msg} (column {err.colno})"))
            continue
        yield Row(source, values if isinstance(values, dict) else DataError(source, "record", "expected a JSON object"))

