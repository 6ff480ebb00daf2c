"""Reads `torch.save` checkpoints (the zip format, torch >= 1.6) without torch, lazily.

A torch zip checkpoint holds `<name>/data.pkl` (a pickle of the saved object) and one
uncompressed member `<name>/data/<key>` per storage.  `load(path)` unpickles data.pkl with
a restricted unpickler and returns the object with every tensor replaced by a `LazyTensor`:
the file, member, dtype, offset, shape and strides of its data, nothing read yet.
`LazyTensor.numpy()` memory-maps exactly that data (numpy, bfloat16 through ml_dtypes), so a
converter that merges tensors one at a time holds about one tensor in memory, however large
the file (NVIDIA's retro-8b base checkpoint is ~98 GB with its optimizer state).

Security: the unpickler builds nothing but tensors, plain containers (dict, list, tuple,
OrderedDict) and argparse.Namespace.  torch dtypes become their names; the numpy arrays of
Megatron's saved RNG state become inert `Opaque` placeholders (never constructed).  A pickle
that asks for any other global (a function, a class) is refused with `ForbiddenClassError`
naming the file and the class: a checkpoint cannot run code here.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointFileError(ValueError):
  """A file that is not a complete torch zip checkpoint; the message names it and the fix."""


class ForbiddenClassError(CheckpointFileError):
  """The pickle asks for a global outside the allow-list (see module docstring)."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class TorchDtype:
  """A torch dtype found in the pickle (e.g. args.params_dtype), kept as its name."""
  name: str

  def __str__(self):
    return f"torch.{self.name}"


class Opaque:
  """Stands for an object the converter never needs (numpy RNG state): absorbs its state."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __repr__(self):
    return "Opaque()"


@dataclasses.dataclass(frozen=True)
class _Storage:
  member: str          # zip member holding the bytes
  dtype: Any           # numpy dtype of the elements
  numel: int


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor of a torch checkpoint, not yet read: `numpy()` memory-maps its data."""
  path: str
  storage: _Storage
  offset: int                    # in elements of storage.dtype
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: Any
  data_start: int                # byte offset of the storage's member data in the file

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def numpy(self) -> np.ndarray:
    """A read-only memory map of the tensor's data, shaped (strided when it was saved so)."""
    itemsize = np.dtype(self.dtype).itemsize
    nbytes_storage = self.storage.numel * np.dtype(self.storage.dtype).itemsize
    count = nbytes_storage // itemsize
    if not count:
      return np.zeros(self.shape, self.dtype)
    flat = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_start,
                     shape=(count,))
    if not self.shape:
      return np.asarray(flat[self.offset])
    contiguous = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64))
                       for i in range(len(self.shape)))
    size = int(np.prod(self.shape, dtype=np.int64))
    if tuple(self.stride) == contiguous or size <= 1:
      return flat[self.offset:self.offset + size].reshape(self.shape)
    return np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.shape,
        strides=tuple(s * itemsize for s in self.stride), writeable=False)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None, dtype=None):
  del requires_grad, backward_hooks, metadata
  return ("tensor", storage, int(storage_offset), tuple(int(s) for s in size),
          tuple(int(s) for s in stride), dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad,
                         backward_hooks, metadata, dtype=dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


def _latin1_bytes(text, encoding="latin1"):
  """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'): allow only that."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode is allowed only as bytes(str, 'latin1')")
  return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    # Megatron's saved RNG state: numpy arrays, never needed, never constructed.
    ("numpy.core.multiarray", "_reconstruct"): Opaque,
    ("numpy._core.multiarray", "_reconstruct"): Opaque,
    ("numpy", "ndarray"): Opaque,
    ("numpy", "dtype"): Opaque,
    ("numpy.core.multiarray", "scalar"): Opaque,
    ("numpy._core.multiarray", "scalar"): Opaque,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, path: str, prefix: str, offsets: dict[str, int]):
    super().__init__(file)
    self._path = path
    self._prefix = prefix
    self._offsets = offsets

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return TorchDtype(name)
    raise ForbiddenClassError(
        f"{self._path}: the pickle asks for {module}.{name}, which this reader refuses "
        f"(it builds only tensors, plain containers and argparse.Namespace): the file is not "
        f"a Megatron checkpoint or was altered; do not load it")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) != 5:
      raise CheckpointFileError(f"{self._path}: unknown persistent id {pid!r} in data.pkl")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFileError(f"{self._path}: storage of unknown type {storage_type!r}")
    member = f"{self._prefix}data/{key}"
    if member not in self._offsets:
      raise CheckpointFileError(f"{self._path}: storage {member} is missing from the archive "
                                f"(a truncated or damaged file): download it again")
    return _Storage(member, _STORAGE_DTYPES[storage_type.name], int(numel))


def _member_offsets(path: str, zf: zipfile.ZipFile) -> dict[str, int]:
  """Byte offset of each stored member's data in the file (checked to lie inside it)."""
  size = os.path.getsize(path)
  offsets = {}
  with open(path, "rb") as f:
    for info in zf.infolist():
      f.seek(info.header_offset)
      header = f.read(30)
      if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFileError(f"{path}: damaged zip entry {info.filename}: download the "
                                  f"file again")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      start = info.header_offset + 30 + name_len + extra_len
      if start + info.compress_size > size:
        raise CheckpointFileError(f"{path}: entry {info.filename} runs past the end of the "
                                  f"file (truncated): download it again")
      offsets[info.filename] = start
  return offsets


def _resolve(obj, path, offsets):
  """Replaces the ("tensor", ...) tuples of the unpickled object by LazyTensors."""
  if isinstance(obj, tuple) and len(obj) == 6 and obj[0] == "tensor" and isinstance(
      obj[1], _Storage):
    _, storage, offset, shape, stride, dtype = obj
    np_dtype = storage.dtype if dtype is None else _TORCH_DTYPES[dtype.name]
    t = LazyTensor(path, storage, offset, shape, stride, np_dtype, offsets[storage.member])
    itemsize = np.dtype(np_dtype).itemsize
    span = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if all(shape) else 0
    if span * itemsize > storage.numel * np.dtype(storage.dtype).itemsize:
      raise CheckpointFileError(f"{path}: a tensor of shape {shape} lies outside its storage "
                                f"{storage.member}: the file is damaged")
    return t
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, path, offsets)) for k, v in obj.items())
  if isinstance(obj, list):
    return [_resolve(v, path, offsets) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, path, offsets) for v in obj)
  if isinstance(obj, argparse.Namespace):
    return argparse.Namespace(**{k: _resolve(v, path, offsets) for k, v in vars(obj).items()})
  return obj


def load(path: str) -> Any:
  """The object saved in `path`, tensors as LazyTensor (see module docstring)."""
  try:
    zf = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointFileError(f"{path}: no such file") from None
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointFileError(
        f"{path}: not a complete torch zip checkpoint ({e}): the file is truncated or was "
        f"written by torch < 1.6; download it again (or re-save it with torch.save)") from None
  with zf:
    names = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(names) != 1:
      raise CheckpointFileError(f"{path}: a torch checkpoint holds one data.pkl, found "
                                f"{len(names)}: not a torch.save file")
    prefix = names[0][:-len("data.pkl")]
    for info in zf.infolist():
      if info.filename.startswith(prefix + "data/") and info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointFileError(f"{path}: storage {info.filename} is compressed; torch.save "
                                  f"stores them uncompressed: re-save the file with torch.save")
    byteorder = prefix + "byteorder"
    if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
      raise CheckpointFileError(f"{path}: big-endian checkpoint; re-save it on a little-endian "
                                f"machine")
    offsets = _member_offsets(path, zf)
    try:
      with zf.open(names[0]) as f:
        obj = _Unpickler(f, path, prefix, offsets).load()
    except CheckpointFileError:
      raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
      raise CheckpointFileError(f"{path}: data.pkl does not unpickle ({type(e).__name__}: "
                                f"{e}): the file is damaged; download it again") from None
  return _resolve(obj, path, offsets)


# --- Writing (tests and benchmarks: a checkpoint torch.load reads, written without torch) ----

_NP_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
               np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
               np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
               np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
               np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


@dataclasses.dataclass(frozen=True)
class _Global:
  """A GLOBAL reference written by name (callable only to satisfy pickle's checks)."""
  module: str
  name: str

  def __call__(self, *args):
    raise TypeError(f"{self.module}.{self.name} is a pickle reference only")


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access  (the pure-Python pickler)
  """Pickles numpy arrays as torch tensors (storages as persistent ids) and _Global markers
  as GLOBAL references, so that torch.load rebuilds real tensors."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, storages):
    super().__init__(file, protocol=2)
    self._storages = storages

  def _save_global_marker(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[_Global] = _save_global_marker

  def persistent_id(self, obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__storage__":
      array = obj[1]
      key = str(len(self._storages))
      self._storages.append((key, array))
      return ("storage", _Global("torch", _NP_STORAGE[array.dtype]), key, "cpu", array.size)
    return None

  def save(self, obj, save_persistent_id=True):  # pylint: disable=arguments-differ
    if isinstance(obj, np.ndarray):
      array = np.ascontiguousarray(obj)
      if array.dtype not in _NP_STORAGE:
        raise TypeError(f"no torch storage for dtype {array.dtype}")
      stride = tuple(int(np.prod(array.shape[i + 1:], dtype=np.int64))
                     for i in range(array.ndim))
      self.save_reduce(_Global("torch._utils", "_rebuild_tensor_v2"),
                       (("__storage__", array), 0, tuple(array.shape), stride, False,
                        collections.OrderedDict()), obj=None)
      return
    if isinstance(obj, argparse.Namespace):
      self.save_reduce(_Global("argparse", "Namespace"), (), state=dict(vars(obj)), obj=obj)
      return
    super().save(obj, save_persistent_id)


def save(obj: Any, path: str, name: str = "archive", alignment: int = 64) -> None:
  """Writes `obj` (dicts, lists, tuples, scalars, strings, argparse.Namespace, numpy arrays
  as tensors) in torch.save's zip format, storages aligned for memory mapping."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  storages: list[tuple[str, np.ndarray]] = []
  _Pickler(buf, storages).dump(obj)

  def write(zf, member, data):
    info = zipfile.ZipInfo(f"{name}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zf.fp.tell() + 30 + len(info.filename.encode("utf-8"))
    pad = (-(start + 4)) % alignment
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=len(data) > 2 ** 31) as f:
      f.write(data)

  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    write(zf, "data.pkl", buf.getvalue())
    write(zf, "byteorder", b"little")
    for key, array in storages:
      write(zf, f"data/{key}", memoryview(array.reshape(-1).view(np.uint8)))
    write(zf, "version", b"3\n")
    write(zf, ".data/serialization_id", b"0")
  os.replace(tmp, path)
