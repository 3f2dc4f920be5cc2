"""Where SYNTH rows come from: local Parquet files, or a `datasets` dataset (saved dir or hub).

Design choices:
- Input is cut into fixed *chunks* of `chunk_rows` consecutive rows (never crossing a file). The
  chunk is the unit of work, of packing, of output shards and of resume, and chunk boundaries
  depend only on the input and `chunk_rows`, so the output is the same for any worker count.
- Parquet chunks are read by the worker itself (only a small spec is sent); `datasets` sources
  are iterated by the main process and the rows sent to workers, which also streams a hub dataset
  without downloading it first.
- Text columns are read as raw bytes and decoded per row, so one invalid UTF-8 value becomes a
  counted `undecodable_text` skip instead of an exception that kills the chunk.
- `describe()` is the input's identity for the manifest and for resume: file sizes and sha256 for
  local data, name + revision for the hub.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vpmoe.data import DataError
from vpmoe.data.render import ID_FIELDS, TEXT_FIELDS, id_column
from vpmoe.utils import file_sha256


@dataclass
class Chunk:
    index: int  # global chunk number: names the output shards
    label: str  # the file (or dataset) the rows come from, for error messages
    first_row: int  # index of the chunk's first row within `label`
    n_rows: int
    path: str | None = None  # parquet chunks: read in the worker
    rows: dict | None = None  # datasets chunks: {column: values}, sent by the main process


def column_values(column) -> list:
    """Arrow column -> Python values; strings come back as bytes (decoded and checked per row)."""
    import pyarrow as pa

    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def require_columns(path, names: list[str]) -> str:
    """The id column of a parquet file's columns `names`; DataError naming the file and the column
    when the id or a text column is absent."""
    id_field = id_column(names)
    if id_field is None:
        raise DataError(f"{path}: no id column (need one of {', '.join(ID_FIELDS)})")
    for name in TEXT_FIELDS:
        if name not in names:
            raise DataError(f"{path}: missing column {name} (columns: {', '.join(names)})")
    return id_field


def rows_from_table(table) -> dict:
    """The id + text columns of an Arrow table; absent columns become all-None (rows then skip)."""
    names = table.column_names
    id_field = id_column(names)
    rows = {"_id_field": id_field or ID_FIELDS[0]}
    rows["id"] = column_values(table.column(id_field)) if id_field else [None] * table.num_rows
    for name in TEXT_FIELDS:
        rows[name] = column_values(table.column(name)) if name in names else [None] * table.num_rows
    return rows


class ParquetSource:
    kind = "parquet"

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.root = Path(path)
        files = [self.root] if self.root.is_file() else sorted(self.root.rglob("*.parquet"))
        if not files:
            raise DataError(f"{self.root}: no .parquet files found")
        self.files, self.rows = files, []
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises several types for a bad footer
                raise DataError(f"{f}: not a readable parquet file: {e}") from None
            require_columns(f, pf.schema_arrow.names)  # absent from a whole file: a schema error, not row skips
            self.rows.append(pf.metadata.num_rows)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def describe(self) -> dict:
        return {"kind": "parquet", "path": str(self.root.resolve()),
                "files": [{"path": str(f.relative_to(self.root)) if f != self.root else f.name,
                           "rows": n, "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                          for f, n in zip(self.files, self.rows)]}

    def chunks(self, chunk_rows: int, skip: set[int]):
        index = 0
        for f, n in zip(self.files, self.rows):
            for start in range(0, n, chunk_rows):
                if index not in skip:
                    yield Chunk(index, str(f), start, min(chunk_rows, n - start), path=str(f))
                index += 1
        self.n_chunks = index


def read_parquet_chunk(chunk: Chunk) -> dict:
    """Read rows [first_row, first_row + n_rows) of one parquet file, whole row groups at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(chunk.path)
        names = source.schema_arrow.names
        wanted = [c for c in (id_column(names), *TEXT_FIELDS) if c in names]
        meta = source.metadata
        groups, group_start, first_group_start = [], 0, None
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if group_start + n > chunk.first_row and group_start < chunk.first_row + chunk.n_rows:
                groups.append(g)
                first_group_start = group_start if first_group_start is None else first_group_start
            group_start += n
        table = source.read_row_groups(groups, columns=wanted) if groups else None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{chunk.path}: cannot read rows {chunk.first_row}..: {e}") from None
    if table is None:
        raise DataError(f"{chunk.path}: no row groups cover rows {chunk.first_row}..")
    table = table.slice(chunk.first_row - first_group_start, chunk.n_rows)
    return rows_from_table(table)


class DatasetsSource:
    """A `datasets.Dataset` / `IterableDataset` (saved to disk, streamed from the hub, or built
    in memory), read in order in batches of `chunk_rows`."""

    kind = "datasets"

    def __init__(self, dataset, description: dict):
        self.dataset, self.description = dataset, description
        self.label = description.get("name") or description.get("path") or "datasets source"

    @property
    def total_rows(self) -> int | None:
        try:
            return len(self.dataset)
        except TypeError:  # streaming: size unknown
            return None

    def describe(self) -> dict:
        return self.description

    def chunks(self, chunk_rows: int, skip: set[int]):
        first_row, count = 0, 0
        for index, batch in enumerate(self.dataset.iter(batch_size=chunk_rows)):
            count = index + 1
            n = len(next(iter(batch.values()))) if batch else 0
            if index not in skip:  # plain Python values: check_row judges each one
                id_field = id_column(batch)
                rows = {"_id_field": id_field or ID_FIELDS[0],
                        "id": list(batch[id_field]) if id_field else [None] * n}
                rows.update({name: list(batch.get(name, [None] * n)) for name in TEXT_FIELDS})
                yield Chunk(index, self.label, first_row, n, rows=rows)
            first_row += n
        self.n_chunks = count


def _hash_dir(path: Path) -> list[dict]:
    return [{"path": str(f.relative_to(path)), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(path.rglob("*")) if f.is_file()]


def open_source(spec: str, split: str = "train"):
    """A local parquet file/folder, a `save_to_disk` folder, or `hf:NAME[@REVISION]` (streamed)."""
    path = Path(spec)
    if path.exists():
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: saved DatasetDict has no split {split!r} ({list(ds)})")
                ds = ds[split]
            return DatasetsSource(ds, {"kind": "saved_dataset", "path": str(path.resolve()),
                                       "split": split, "files": _hash_dir(path)})
        return ParquetSource(path)
    if spec.startswith("hf:") or (spec.count("/") == 1 and not spec.startswith((".", "/"))):
        name, _, revision = spec.removeprefix("hf:").partition("@")
        try:
            import datasets
        except ImportError:
            raise DataError(f"{spec}: streaming a hub dataset needs the `datasets` package "
                            "(pip install datasets)") from None
        resolved = _resolve_revision(name, revision or "main")
        try:
            ds = datasets.load_dataset(name, split=split, streaming=True, revision=resolved)
        except Exception as e:  # network, auth, unknown name: one clear line
            raise DataError(f"{spec}: cannot stream dataset: {e}") from None
        return DatasetsSource(ds, {"kind": "hf", "name": name, "split": split,
                                   "revision": revision or "main", "resolved_revision": resolved})
    raise DataError(f"{spec}: input not found (a parquet file/folder, a saved dataset, or hf:NAME)")


def _resolve_revision(name: str, revision: str) -> str:
    """Pin a hub revision to its commit sha when the hub can be asked (else keep the name)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha or revision
    except Exception:
        return revision


def split_of(row_id: str, valid_fraction: float) -> str:
    """'valid' iff the first 8 bytes of sha256(row_id) as a big-endian fraction of 2^64 < fraction."""
    h = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big")
    return "valid" if h < valid_fraction * 2.0 ** 64 else "train"


SPLIT_RULE = ("valid iff int.from_bytes(sha256(utf8(row_id))[:8], 'big') < valid_fraction * 2**64; "
              "row_id = synth_id, else row_id column")

