"""PyTorch checkpoint files (`torch.save`'s zip format) read without torch, and without running
anything from the file (issue 24).

`torch.load` unpickles: a checkpoint may name any Python callable and have it called. This
reader unpickles with a `find_class` that answers only:
- the tensor and storage globals `torch.save` writes (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`, `torch.FloatStorage` …), rebuilt here as numpy arrays from the
  archive's storage records;
- `collections.OrderedDict` and `defaultdict` (omegaconf's metadata holds one);
- inert records for the classes fairseq checkpoints hold besides tensors: omegaconf configs and
  their nodes, `argparse.Namespace`, fairseq's meters and enums, numpy scalars, typing and
  builtin type markers. A record only stores what the pickle gives it; `plain` turns configs
  into dicts and lists and anything else into its plain content;
and refuses every other global with an error naming it. So fairseq's omegaconf and argparse
configs, BEiT's `model_ema` and 2.0's `_ema` load as they were saved, with no torch installed
and no re-save step.

The legacy (pre-zip, torch < 1.6) format is refused with a message saying how to re-save it.
"""

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {  # torch.<dtype> globals (UntypedStorage files name the dtype, not the storage)
  "float64": np.float64,
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "int32": np.int32,
  "int16": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
}
# Modules whose classes become inert records (never imported, never called).
_RECORDED_MODULES = ("omegaconf", "fairseq", "argparse", "typing", "enum", "numpy", "_codecs")
_BUILTIN_TYPES = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool"}
_BUILTIN_TYPES |= {"object", "bytes", "complex", "NoneType", "type"}


class UnsafePickleError(pickle.UnpicklingError):
  """The file names a global this reader does not accept."""


class Record:
  """What the pickle said about an object of a class this reader does not run: the class's
  name, its constructor arguments and its state."""

  qualname = "?"

  def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ and REDUCE both arrive here
    record = super().__new__(cls)
    record.args, record.kwargs, record.state = args, kwargs, None
    return record

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"<{self.qualname}>"


def _record_class(qualname: str) -> type:
  return type("Record", (Record,), {"qualname": qualname})


def _rebuild_tensor(storage: tuple, offset: int, size, stride, *_):
  """numpy's copy of torch's strided view of `storage` ((dtype, bytes))."""
  dtype, data = storage
  base = np.frombuffer(data, dtype=dtype)
  if not size:
    return base[offset].copy()
  itemsize = base.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    base[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.array(view)


def _rebuild_parameter(tensor, *_):
  return tensor


_TORCH_FUNCTIONS = {
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, where: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.where = archive, prefix, where
    self.storages: dict[str, bytes] = {}

  def find_class(self, module: str, name: str):
    # Protocol-2 pickles name Python 2 modules (`__builtin__`); map them as pickle itself does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _TORCH_FUNCTIONS:
      return _TORCH_FUNCTIONS[(module, name)]
    if module == "torch" and (name in _STORAGE_DTYPES or name in _TORCH_DTYPES):
      return ("dtype", _STORAGE_DTYPES.get(name) or _TORCH_DTYPES[name])
    if module == "collections" and name in ("OrderedDict", "defaultdict"):
      return getattr(collections, name)  # containers: building one calls nothing of the file's
    if module.split(".")[0] in _RECORDED_MODULES or (
      module == "builtins" and name in _BUILTIN_TYPES
    ):
      return _record_class(f"{module}.{name}")
    raise UnsafePickleError(
      f"{self.where} names the global {module}.{name}, which a checkpoint of tensors and "
      "configs does not need; it was not loaded (nothing in it was run)"
    )

  def persistent_load(self, pid):
    kind, storage_type, key = pid[:3]
    if kind != "storage" or not (isinstance(storage_type, tuple) and storage_type[0] == "dtype"):
      raise UnsafePickleError(f"{self.where}: unknown persistent record {pid[:2]!r}")
    if key not in self.storages:
      self.storages[key] = self.archive.read(f"{self.prefix}data/{key}")
    return storage_type[1], self.storages[key]


def load(path) -> Any:
  """The object `torch.save` wrote to `path`, tensors as numpy arrays (their own dtypes;
  bfloat16 as `ml_dtypes.bfloat16`), unknown classes as `Record`s.

  Raises:
    UnsafePickleError: the file names a global outside the accepted set (named).
    ValueError: not a torch zip archive (the legacy format, or not a checkpoint at all).
  """
  where = str(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(
      f"{where} is not a torch zip archive: a file of torch < 1.6's legacy format (re-save it "
      "once with torch.save(torch.load(IN), OUT) where you trust it) or no checkpoint at all"
    )
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{where}: expected one data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise ValueError(f"{where}: big-endian storages are not supported")
    return _Unpickler(archive.read(pickles[0]), archive, prefix, where).load()


def plain(value: Any) -> Any:
  """`value` with records turned into plain data: omegaconf DictConfig/ListConfig -> dict/list
  (their nodes -> values), argparse.Namespace -> dict, enums -> their value, other records ->
  their state or single argument."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(plain(v) for v in value)
  if not isinstance(value, Record):
    return value
  state = value.state
  if value.qualname.startswith("omegaconf."):
    content = state.get("_content") if isinstance(state, dict) else None
    if isinstance(state, dict) and "_val" in state:  # a value node
      return plain(state["_val"])
    return plain(content)
  if isinstance(state, dict):
    return plain(state)
  if len(value.args) == 1:
    return plain(value.args[0])
  return plain(list(value.args)) if value.args else None


# ----------------------------------------------------------------------------- writing

_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if k != "BFloat16Storage"}


class _Writer:
  """Emits the protocol-2 pickle `torch.save` writes, for dicts, lists, tuples, strings, numbers,
  None and numpy arrays (as tensors whose storages go to `data/<key>`), without torch."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[bytes] = []

  def op(self, code: bytes, payload: bytes = b""):
    self.out.write(code + payload)

  def string(self, text: str):
    data = text.encode("utf-8")
    self.op(b"X", len(data).to_bytes(4, "little") + data)  # BINUNICODE

  def value(self, v):
    if v is None:
      self.op(b"N")
    elif isinstance(v, bool | np.bool_):
      self.op(b"\x88" if v else b"\x89")
    elif isinstance(v, int | np.integer) and -(2**31) <= int(v) < 2**31:
      self.op(b"J", int(v).to_bytes(4, "little", signed=True))  # BININT
    elif isinstance(v, float | np.floating):
      self.op(b"G", struct.pack(">d", float(v)))  # BINFLOAT, big-endian
    elif isinstance(v, str):
      self.string(v)
    elif isinstance(v, np.ndarray):
      self.tensor(v)
    elif isinstance(v, Mapping):
      self.op(b"}")  # EMPTY_DICT
      if v:
        self.op(b"(")  # MARK
        for key, item in v.items():
          self.value(key)
          self.value(item)
        self.op(b"u")  # SETITEMS
    elif isinstance(v, list):
      self.op(b"]")  # EMPTY_LIST
      if v:
        self.op(b"(")
        for item in v:
          self.value(item)
        self.op(b"e")  # APPENDS
    elif isinstance(v, tuple):
      self.op(b"(")
      for item in v:
        self.value(item)
      self.op(b"t")  # TUPLE
    else:
      raise TypeError(f"cannot write {type(v).__name__} into a torch file")

  def tensor(self, array: np.ndarray):
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
      array = array.copy(order="C")
    if array.dtype not in _STORAGE_NAMES:
      raise TypeError(f"cannot write a {array.dtype} array into a torch file")
    key = str(len(self.storages))
    self.storages.append(array.tobytes())
    self.op(b"ctorch._utils\n_rebuild_tensor_v2\n")  # GLOBAL
    self.op(b"(")  # the arguments: storage, offset, size, stride, requires_grad, hooks
    self.op(b"(")  # the storage's persistent id
    self.string("storage")
    self.op(f"ctorch\n{_STORAGE_NAMES[array.dtype]}\n".encode())
    self.string(key)
    self.string("cpu")
    self.value(int(array.size))
    self.op(b"t")
    self.op(b"Q")  # BINPERSID
    self.value(0)
    self.value(tuple(int(n) for n in array.shape))
    strides = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    self.value(strides)
    self.value(False)
    self.op(b"ccollections\nOrderedDict\n)R")  # OrderedDict() for the backward hooks
    self.op(b"t")
    self.op(b"R")  # REDUCE


def save(obj: Any, path) -> None:
  """Writes `obj` (plain containers and numpy arrays) in `torch.save`'s zip format, which
  `torch.load(path, weights_only=True)` reads; bfloat16 is not written (widen it first)."""
  writer = _Writer()
  writer.op(b"\x80\x02")  # PROTO 2
  writer.value(obj)
  writer.op(b".")  # STOP
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", writer.out.getvalue())
    archive.writestr("archive/byteorder", "little")
    for key, data in enumerate(writer.storages):
      archive.writestr(f"archive/data/{key}", data)
    archive.writestr("archive/version", "3\n")
