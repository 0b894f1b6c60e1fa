"""Reading scoring inputs chunk by chunk: .npy (read straight from the file, never whole),
.npz members (``file.npz:key``) and Parquet columns (``file.parquet:column``, via pyarrow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """A problem with an input file: missing, unreadable, wrong key or column."""


def _split_spec(spec: str) -> tuple[Path, str | None]:
    for suffix in (".npz", ".parquet"):
        if f"{suffix}:" in spec:
            path, key = spec.rsplit(":", 1)
            return Path(path), key
    return Path(spec), None


def open_input(spec: str, name: str):
    """An input source for `spec`: .npy, file.npz:key or file.parquet:column."""
    path, key = _split_spec(spec)
    if not path.exists():
        raise InputError(f"{name}: no such file: {path}")
    if path.is_dir():
        raise InputError(f"{name}: {path} is a folder, not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return NpySource(path)
        if suffix == ".npz":
            if key is None:
                raise InputError(f"{name}: give the array of {path} as {path}:KEY")
            return NpzSource(path, key, name)
        if suffix == ".parquet":
            if key is None:
                raise InputError(f"{name}: give the column of {path} as {path}:COLUMN")
            return ParquetSource(path, key, name)
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{name}: cannot read {path}: {exc}") from None
    raise InputError(f"{name}: {path} is not a .npy, .npz or .parquet file")


class NpySource:
    """A .npy file read in row ranges with plain file reads (bounded memory, any file size)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if dtype.hasobject:
            raise ValueError("object arrays are not read (they would need pickle)")
        self.shape, self.dtype, self.fortran = tuple(shape), dtype, fortran
        self.rows = self.shape[0] if self.shape else 1
        self.row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        expected = self.offset + self.rows * self.row_bytes
        if os.path.getsize(path) < expected:
            raise ValueError(f"the file is truncated ({os.path.getsize(path)} < {expected} bytes)")
        self._mmap = None
        self._fh = None

    def read(self, start: int, stop: int) -> np.ndarray:
        if not self.shape:
            return np.fromfile(self.path, self.dtype, count=1, offset=self.offset).reshape(())
        if self.fortran:  # rows are not contiguous in the file: read through a memory map
            if self._mmap is None:
                self._mmap = np.load(self.path, mmap_mode="r")
            return np.ascontiguousarray(self._mmap[start:stop])
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across chunks
        count = (stop - start) * self.row_bytes
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        self._fh.seek(self.offset + start * self.row_bytes)
        got = self._fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != count:
            raise InputError(f"{self.path}: short read ({got} of {count} bytes)")
        return out

    def close(self):
        if self._fh is not None:
            self._fh.close()
        self._mmap = None


class NpzSource:
    """One member of a .npz archive (loaded whole: archives are not streamed)."""

    def __init__(self, path: Path, key: str, name: str):
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                have = ", ".join(archive.files) or "nothing"
                raise InputError(f"{name}: {path} has no array {key!r}; it has: {have}")
            self.array = archive[key]
        self.shape, self.dtype = self.array.shape, self.array.dtype
        self.rows = self.shape[0] if self.shape else 1

    def read(self, start, stop):
        return self.array[start:stop] if self.shape else self.array

    def close(self):
        pass


class ParquetSource:
    """One column of a Parquet file, read batch by batch. List columns become 2-d rows."""

    def __init__(self, path: Path, column: str, name: str):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{name}: reading Parquet needs pyarrow "
                             "(pip install 'gpuloss[parquet]')") from None
        self.file = pq.ParquetFile(path)
        names = self.file.schema_arrow.names
        if column not in names:
            raise InputError(f"{name}: {path} has no column {column!r}; it has: {', '.join(names)}")
        self.column = column
        self.rows = self.file.metadata.num_rows
        first = self._to_numpy(self.file.read_row_group(0, columns=[column]).column(0)) \
            if self.file.num_row_groups else np.empty(0)
        self.shape = (self.rows, *first.shape[1:])
        self.dtype = first.dtype
        self._batches = None
        self._buffer = None
        self._consumed = 0

    @staticmethod
    def _to_numpy(col) -> np.ndarray:
        import pyarrow as pa

        col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or \
                pa.types.is_large_list(col.type):
            values = col.flatten().to_numpy(zero_copy_only=False)
            return values.reshape(len(col), -1) if len(col) else values.reshape(0, 0)
        return col.to_numpy(zero_copy_only=False)

    def read(self, start, stop):
        """Rows [start, stop); scoring reads them in order, batch by batch."""
        if start != self._consumed:
            raise InputError(f"{self.column}: Parquet rows are read in order only")
        if self._batches is None:
            self._batches = self.file.iter_batches(batch_size=max(stop - start, 1 << 16),
                                                   columns=[self.column])
        parts, need = [], stop - start
        while need > 0:
            if self._buffer is None or len(self._buffer) == 0:
                self._buffer = self._to_numpy(next(self._batches).column(0))
            parts.append(self._buffer[:need])
            self._buffer = self._buffer[need:]
            need -= len(parts[-1])
        self._consumed = stop
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def close(self):
        self._batches = None
