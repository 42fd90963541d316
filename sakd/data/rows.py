"""Reading rows from the sources a data set can be: JSON lines, parquet, a ``save_to_disk`` folder, a hub
data set. One reader for text (``sakd.data.text.read_source``) and chat (``sakd.data.chat_formats``): the
same file gives the same rows, and bad input the same one-line error, whichever reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from sakd.errors import UserError


def json_rows(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is a UserError."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where} line {n} is not JSON: fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} line {n} is not a JSON object")
        yield n, row


def parquet_file(p: Path, where: str):
    """A ``pyarrow.parquet.ParquetFile`` (read batch by batch, or column by column)."""
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{where} is not a readable parquet file ({type(e).__name__})") from None


def parquet_rows(p: Path, where: str) -> Iterator[dict]:
    """Every row of a parquet file, 256 at a time (no progress bars; one row read to detect a format)."""
    for batch in parquet_file(p, where).iter_batches(batch_size=256):
        yield from batch.to_pylist()


def dataset_folder(p: Path, split: str, where: str):
    """A ``datasets.save_to_disk`` folder; of a DatasetDict, its ``split``."""
    try:
        import datasets

        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - any failure here means "not a dataset folder"
        raise UserError(f"{where} is not a datasets save_to_disk folder ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{where} has no split {split!r} (splits: {', '.join(ds)}); set data.split")
        ds = ds[split]
    return ds


def hub_dataset(source: str, config_name: str | None, split: str, streaming: bool):
    """``datasets.load_dataset``; offline, missing or private all end in one UserError."""
    try:
        import datasets

        return datasets.load_dataset(source, config_name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - offline, missing, private: all mean "cannot read"
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"cannot load dataset {source!r} ({type(e).__name__}: {first}); "
                        "check the name, or use a local file") from None
