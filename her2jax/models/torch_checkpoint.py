"""Read PyTorch and safetensors checkpoints into numpy, without torch and without running them.

A ``torch.save`` file is a pickle, and unpickling calls whatever callables the pickle names.
Here the unpickler's ``find_class`` admits only an allow-list of globals (the tensor rebuild
functions, the storage and dtype names, ``torch.Size``, ``collections.OrderedDict`` and the
builtins that pickle protocol 2 needs for sets and bytes), each mapped to a stand-in written in
this file, never to the real torch object; anything else is refused before it is looked up,
let alone called. The stand-ins validate their arguments (storage types, dtypes, sizes,
strides and offsets inside the storage) before numpy touches any memory. The unpickler is
Python's pure implementation (the C one sizes its memo from indices in the file, see
``_Unpickler``), declared sizes are checked against the bytes present before anything is
allocated, and ``torch`` itself is never imported. What remains possible with a forged file is
only wasted CPU (e.g. hashing deeply shared tuples), never running code or reading memory.

Formats read:

* the PyTorch zip serialisation (``torch.save`` since 1.6): ``<prefix>/data.pkl`` with the
  object, ``<prefix>/data/<key>`` with each storage's raw bytes, ``<prefix>/byteorder``;
* the PyTorch legacy serialisation (``_use_new_zipfile_serialization=False``; files from
  PyTorch 0.4 to 1.5, such as MedicalNet's): pickles of the magic number, the protocol version
  and sys_info, the object, the sorted list of storage keys, then each storage as an int64
  element count and its little-endian bytes;
* safetensors: a u64 header length, a JSON header, the raw little-endian data.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import json
import math
import mmap
import pickle
import reprlib
import stat
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from her2jax.errors import Her2jaxError

__all__ = ["load_state", "sha256"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py, legacy format
_PROTOCOL_VERSION = 1001
_MAX_DIMS = 64                         # numpy's limit
_MAX_DIM = 1 << 62
_MAX_SAFETENSORS_HEADER = 100 << 20    # the safetensors library's own limit
# Tensors may materialise at most this many bytes: views that overlap or broadcast (stride 0)
# can legitimately exceed the storage bytes a little, a crafted pickle by a factor of millions.
_BUDGET_FACTOR = 4
_BUDGET_SLACK = 64 << 20
_MAX_ZIP_EXPANSION = 16

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint64": np.dtype(np.uint64),
    "uint32": np.dtype(np.uint32),
    "uint16": np.dtype(np.uint16),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16"}
_UNSUPPORTED_DTYPES = {
    **dict.fromkeys(["complex32", "complex64", "complex128", "cfloat", "cdouble", "chalf"],
                    "a complex tensor"),
    **dict.fromkeys(["qint8", "qint32", "quint8", "quint4x2", "quint2x4"], "a quantized tensor"),
    **dict.fromkeys(["bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float4_e2m1fn_x2"],
                    "a bit-packed tensor"),
}
# The legacy <Type>Storage classes that torch.save writes as a tensor's storage type.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
_UNSUPPORTED_STORAGES = {
    **dict.fromkeys(["ComplexDoubleStorage", "ComplexFloatStorage"], "a complex tensor"),
    **dict.fromkeys(["QInt8Storage", "QInt32Storage", "QUInt8Storage", "QUInt4x2Storage",
                     "QUInt2x4Storage"], "a quantized tensor"),
}
_UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_sparse_csr_tensor": "a sparse tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (saved without data)",
    "_rebuild_wrapper_subclass": "a tensor subclass without storage",
    "_rebuild_device_tensor_from_numpy": "a tensor of a storage-less device (XLA, MTIA)",
    "_rebuild_device_tensor_from_cpu_tensor": "a tensor of a storage-less device (XLA, MTIA)",
    "_rebuild_xla_tensor": "an XLA tensor",
    "_rebuild_mlc_tensor": "an MLC tensor",
}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def load_state(path) -> dict[str, object]:
    """Reads a PyTorch or safetensors checkpoint, with every tensor as a numpy array.

    Args:
      path: a ``.pth`` / ``.pth.tar`` / ``.pt`` file written by ``torch.save`` (zip or legacy
        serialisation) or a ``.safetensors`` file. The format is found from the content.

    Returns:
      For PyTorch files the saved top-level object (usually a dict such as a state_dict or
      ``{"state_dict": ..., "epoch": ...}``) with dicts, OrderedDicts, lists, tuples, sets and
      plain Python values kept and every tensor (or ``nn.Parameter``) replaced by a
      C-contiguous numpy array of its dtype and shape (bfloat16 and float8 as ``ml_dtypes``);
      for safetensors a flat dict name -> array. No two arrays share memory.

    Raises:
      Her2jaxError: naming the file, when it is missing, empty, truncated, not a checkpoint,
        holds a tensor type that has no numpy equivalent (complex, quantized, sparse), or
        references any Python global outside the allow-list (which could run code).
    """
    path = Path(path)
    head, size = _head(path)
    try:
        kind = _sniff(head, size)
        if kind == "zip":
            return _load_zip(path, size)
        if kind == "pickle":
            return _load_legacy(path, size)
        return _load_safetensors(path, size)
    except _Bad as bad:
        raise Her2jaxError(str(bad), file=str(path)) from None
    except OSError as error:
        raise Her2jaxError(f"cannot be read ({error.strerror or error})", file=str(path)) from None


def sha256(path) -> str:
    """The sha256 hex digest of a file (recorded with a port so its source is identifiable)."""
    path = Path(path)
    _head(path)
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as error:
        raise Her2jaxError(f"cannot be read ({error.strerror or error})", file=str(path)) from None


class _Bad(Exception):
    """A reason the file cannot be loaded; ``load_state`` adds the file name."""


def _head(path: Path) -> tuple[bytes, int]:
    """The first 512 bytes and the size of a regular, non-empty file, or a Her2jaxError."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise Her2jaxError("is a directory, not a checkpoint file", file=str(path))
        if not stat.S_ISREG(info.st_mode):
            raise Her2jaxError("is not a regular file", file=str(path))
        if info.st_size == 0:
            raise Her2jaxError("is empty (0 bytes), not a checkpoint", file=str(path))
        with open(path, "rb") as f:
            return f.read(512), info.st_size
    except FileNotFoundError:
        raise Her2jaxError("checkpoint file not found", file=str(path)) from None
    except OSError as error:
        raise Her2jaxError(f"cannot be read ({error.strerror or error})", file=str(path)) from None


def _sniff(head: bytes, size: int) -> str:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x80"):  # a binary pickle: the legacy format starts with the magic number
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if length <= _MAX_SAFETENSORS_HEADER:
            return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise _Bad("is a tar archive (PyTorch's pre-0.4 serialisation or an unrelated archive),"
                   " which her2jax does not read; re-save its tensors with a current PyTorch"
                   " or as .safetensors")
    raise _Bad(f"not a PyTorch or safetensors checkpoint ({_describe(head)})")


def _describe(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data, e.g. a .nii.gz volume"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return "a NIfTI-1 volume"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # a character cut at the end of the 512 bytes is fine
        if error.start < len(head) - 3:
            return "unrecognised binary data"
        text = head[: error.start].decode("utf-8")
    return "a text file" if all(c.isprintable() or c in "\r\n\t" for c in text) else \
        "unrecognised binary data"


def _bounded_repr() -> reprlib.Repr:
    # A pickle can nest shared references so that a full repr would be exponentially long.
    bounded = reprlib.Repr()
    bounded.maxlevel = 3
    bounded.maxstring = bounded.maxother = bounded.maxlong = 80
    bounded.maxtuple = bounded.maxlist = bounded.maxdict = bounded.maxset = 6
    return bounded


_REPR = _bounded_repr()


def _short(value, limit: int = 120) -> str:
    """One line, at most ``limit`` characters, of a value that may come from the file."""
    try:
        text = value if isinstance(value, str) and value.isprintable() else _REPR.repr(value)
    except Exception:  # a pathological object (an int too long to print); only for a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ stand-ins for torch globals


class _Sealed:
    """Base of every object ``find_class`` or ``persistent_load`` hands to the unpickler.

    The BUILD opcode sets state on whatever object is on the stack (through ``__setstate__``,
    or by writing attributes); these objects refuse it, so a pickle cannot rewrite a validated
    storage or one of the allowed callables.
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise _Bad(f"corrupt pickle (it tries to set the state of {self})")


class _DType(_Sealed):
    __slots__ = ("name", "np")

    def __init__(self, name: str):
        self.name = name
        self.np = _NUMPY_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_DTYPES = {name: _DType(name) for name in _NUMPY_DTYPES}


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = _DTYPES[dtype]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Sealed):
    """One storage: ``numel`` elements of ``stype``; ``raw`` is None until its bytes are read."""

    __slots__ = ("stype", "numel", "raw", "byteorder")

    def __init__(self, stype: _StorageType, numel: int, raw: bytes | None,
                 byteorder: str = "little"):
        self.stype = stype
        self.numel = numel
        self.raw = raw
        self.byteorder = byteorder

    @property
    def nbytes(self) -> int:
        return self.numel * self.stype.dtype.np.itemsize

    def __repr__(self) -> str:
        return f"{self.stype!r}({self.numel})"

    def tensor(self, dtype: _DType, offset: int, size: tuple, stride: tuple) -> np.ndarray:
        """A C-contiguous copy of the (already bounds-checked) strided view."""
        itemsize = dtype.np.itemsize
        if math.prod(size) == 0:
            return np.zeros(size, dtype.np)
        # Work on unsigned words of the element size, so every dtype (bfloat16 and float8
        # included) is byte-swapped, copied and reinterpreted the same way.
        word = np.dtype(np.uint8) if itemsize == 1 else np.dtype(
            ("<" if self.byteorder == "little" else ">") + f"u{itemsize}")
        words = np.frombuffer(self.raw, dtype=word, count=len(self.raw) // itemsize)
        strides = tuple(s * itemsize if n > 1 else 0 for n, s in zip(size, stride, strict=True))
        view = np.lib.stride_tricks.as_strided(words[offset:], shape=size, strides=strides,
                                               writeable=False)
        out = np.array(view, dtype=word.newbyteorder("="), order="C")
        if dtype.name == "bool":
            return out != 0  # any non-zero byte is True, as in torch
        return out.view(dtype.np)


class _Pending(_Sealed):
    """A validated tensor whose storage bytes are not read yet (legacy format, first pass)."""

    __slots__ = ()


_PENDING = _Pending()


class _TensorType(_Sealed):
    """Stands for ``torch.Tensor`` / ``nn.Parameter`` as ``_rebuild_from_type_v2``'s type."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _Allowed(_Sealed):
    """An allow-listed callable: the qualified name it stands for and our implementation."""

    __slots__ = ("name", "fn", "makes_tensor")

    def __init__(self, name: str, fn: Callable, makes_tensor: bool = False):
        self.name = name
        self.fn = fn
        self.makes_tensor = makes_tensor

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name


def _count(value, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_DIM:
        raise _Bad(f"corrupt pickle ({what} {_short(value)} is not a count)")
    return value


def _dims(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > _MAX_DIMS:
        raise _Bad(f"corrupt pickle ({what} {_short(value)} is not a shape)")
    return tuple(_count(v, what) for v in value)


def _torch_size(dims) -> tuple[int, ...]:
    return _dims(dims, "torch.Size")


def _latin1_bytes(text, encoding) -> bytes:
    # Pickle protocol 2 writes bytes as _codecs.encode(str, "latin1"); nothing else is admitted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad(f"corrupt pickle (_codecs.encode with {_short(encoding)})")
    return text.encode("latin-1")


def _static_globals() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,  # state_dict containers (an immutable type)
        ("builtins", "set"): set,                     # protocol 2 writes sets as set(list)
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _Allowed("_codecs.encode", _latin1_bytes),  # protocol 2 bytes
        ("torch", "Size"): _Allowed("torch.Size", _torch_size),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        # torch.cuda.<Type>Storage: legacy files saved from GPU tensors (torch maps both alike).
        for module in ("torch", "torch.cuda"):
            table[module, name] = _StorageType(name, dtype)
    for module in ("torch", "torch.storage"):
        table[module, "UntypedStorage"] = _StorageType("UntypedStorage", "uint8")
    for name in _NUMPY_DTYPES:
        table["torch", name] = _DTYPES[name]
    for alias, name in _DTYPE_ALIASES.items():
        table["torch", alias] = _DTYPES[name]
    for module, name in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
                         ("torch.nn.parameter", "Parameter"), ("torch.nn", "Parameter")):
        table[module, name] = _TensorType(f"{module}.{name}")
    return table


_STATIC_GLOBALS = _static_globals()
_TENSOR_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                    "_rebuild_parameter", "_rebuild_parameter_with_state")

# persistent_load(storage_type, key, numel, view_metadata) -> _Storage
_StorageLoader = Callable[[_StorageType, str, int, object], _Storage]


def _refuse_opcode(unpickler) -> None:
    raise _Bad("corrupt pickle (an out-of-band buffer or unknown opcode; torch.save writes"
               " neither)")


def _dispatch() -> dict:
    # Out-of-band buffers (protocol 5) are never written by torch.save, and BYTEARRAY8 would
    # allocate (and zero) its declared length before reading it.
    table = dict(pickle._Unpickler.dispatch)
    for opcode in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        table[opcode[0]] = _refuse_opcode
    for code in range(256):
        table.setdefault(code, _refuse_opcode)
    return table


class _Unpickler(pickle._Unpickler):
    """Unpickles with an allow-list of globals; tensors come back as numpy arrays.

    Python's own implementation, not the C one: the C unpickler sizes its memo table from the
    indices the pickle names, so one ``LONG_BINPUT 4000000000`` asks for 32 GB (found by
    fuzzing); this one keeps its memo in a dict and never reads more than the data holds.
    """

    dispatch = _dispatch()

    def __init__(self, file, load_storage: _StorageLoader | None, budget: int):
        super().__init__(file, encoding="utf-8")  # Python 2 str as torch.load decodes it
        self._load_storage = load_storage
        self._budget = budget
        self.arrays: list[np.ndarray] = []  # read-only until the pickle is done
        self._globals = dict(_STATIC_GLOBALS)
        for name in _TENSOR_REBUILDS:
            self._globals["torch._utils", name] = _Allowed(
                f"torch._utils.{name}", getattr(self, name), makes_tensor=True)
        self._globals["torch._tensor", "_rebuild_from_type_v2"] = _Allowed(
            "torch._tensor._rebuild_from_type_v2", self._rebuild_from_type_v2)

    def release(self) -> None:
        """Drops the memo (which holds the storages) and the allowed callables, which point
        back here, so the storages are freed now rather than at the next cycle collection."""
        self.memo.clear()
        self._globals.clear()
        self.arrays.clear()
        self.metastack = self.stack = []

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Bad("corrupt pickle (a global with a non-text name)")
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle maps them
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self._globals.get((module, name))
        if found is not None:
            return found
        qualified = _short(f"{module}.{name}")
        what = None
        if module == "torch._utils":
            what = _UNSUPPORTED_REBUILDS.get(name)
        elif module in ("torch", "torch.cuda"):
            what = _UNSUPPORTED_STORAGES.get(name) or _UNSUPPORTED_DTYPES.get(name)
        if what:
            raise _Bad(f"holds {what} ({qualified}), which her2jax cannot read; re-save it as a"
                       " dense real-valued tensor")
        raise _Bad(f"refuses to load: the pickle references {qualified}, which is not on the"
                   " allow-list of tensor types (loading it could run code); if you trust the"
                   " file, re-save just its tensors (a state_dict) or convert it to .safetensors")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or self._load_storage is None:
            raise _Bad(f"corrupt pickle (unexpected persistent id {_short(pid)})")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise _Bad(f"corrupt pickle (unexpected persistent id {_short(pid)})")
        stype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(stype, _StorageType):
            raise _Bad(f"corrupt pickle (storage type {_short(stype)})")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str):
            raise _Bad(f"corrupt pickle (storage key {_short(key)})")
        view = pid[5] if len(pid) == 6 else None
        return self._load_storage(stype, key, _count(numel, "storage size"), view)

    # -- the allow-listed torch._utils functions; the signatures are torch's

    def _tensor(self, storage, offset, size, stride, dtype=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise _Bad(f"corrupt pickle (tensor storage {_short(storage)})")
        if dtype is None:
            dtype = storage.stype.dtype
        if not isinstance(dtype, _DType):
            raise _Bad(f"corrupt pickle (tensor dtype {_short(dtype)})")
        offset = _count(offset, "storage offset")
        size, stride = _dims(size, "tensor size"), _dims(stride, "tensor stride")
        if len(size) != len(stride):
            raise _Bad(f"corrupt pickle (tensor size {size} with stride {stride})")
        capacity = storage.nbytes // dtype.np.itemsize
        numel = math.prod(size)
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= capacity:
                raise _Bad(f"corrupt checkpoint (a tensor of size {size}, stride {stride} and"
                           f" offset {offset} reaches past its storage of {capacity} elements)")
        self._budget -= numel * dtype.np.itemsize
        if self._budget < 0:
            raise _Bad("refuses to load: its tensors would take far more memory than the file"
                       " holds (memory-bomb guard)")
        negate = _negate(metadata, dtype)
        if storage.raw is None:
            return _PENDING
        array = storage.tensor(dtype, offset, size, stride)
        if negate:
            np.negative(array, out=array)
        array.flags.writeable = False  # so SETITEM opcodes cannot write into it
        self.arrays.append(array)
        return array

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, metadata=None):
        return self._tensor(storage, storage_offset, size, stride, metadata=metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, _DType):
            raise _Bad(f"corrupt pickle (tensor dtype {_short(dtype)})")
        return self._tensor(storage, storage_offset, size, stride, dtype, metadata)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        return _tensor_only(data)

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return _tensor_only(data)  # the state (Python attributes) is dropped

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        # A tensor (or Parameter) that carried Python attributes: rebuild the plain tensor.
        if not (isinstance(func, _Allowed) and func.makes_tensor
                and isinstance(new_type, _TensorType) and isinstance(args, tuple)):
            raise _Bad(f"corrupt pickle (_rebuild_from_type_v2 of {_short(func)},"
                       f" {_short(new_type)})")
        return _tensor_only(func(*args))


def _tensor_only(data):
    if not isinstance(data, np.ndarray | _Pending):
        raise _Bad(f"corrupt pickle (a parameter of {_short(data)})")
    return data


def _negate(metadata, dtype: _DType) -> bool:
    """Whether the tensor carries torch's lazy negation bit (``metadata={'neg': True}``)."""
    if metadata is None or (isinstance(metadata, dict) and not metadata):
        return False
    if not isinstance(metadata, dict) or not set(metadata) <= {"neg", "conj"}:
        raise _Bad(f"corrupt pickle (tensor metadata {_short(metadata)})")
    if metadata.get("conj"):
        raise _Bad("holds a conjugated complex tensor, which her2jax cannot read")
    negate = bool(metadata.get("neg"))
    if negate and (dtype.name == "bool" or dtype.name.startswith("uint")):
        raise _Bad(f"corrupt pickle (a negated {dtype!r} tensor)")
    return negate


def _unpickle(file, load_storage: _StorageLoader | None, budget: int = 0):
    """One pickle from ``file`` through the restricted unpickler; errors become ``_Bad``."""
    unpickler = _Unpickler(file, load_storage, budget)
    try:
        result = unpickler.load()
        for array in unpickler.arrays:
            array.flags.writeable = True
        return result
    except _Bad:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError, struct.error) as error:
        detail = type(error).__name__ + (f": {_short(str(error))}" if str(error) else "")
        raise _Bad(f"truncated or corrupt pickle ({detail})") from None
    finally:
        unpickler.release()


# ------------------------------------------------------------------------------- zip format


def _read_entry(archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError) as error:
        raise _Bad(f"zip entry {_short(name)} is truncated or corrupt"
                   f" ({_short(str(error))})") from None


def _load_zip(path: Path, size: int):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise _Bad(f"truncated or corrupt zip archive ({_short(str(error))})") from None
    with archive:
        held = sum(info.file_size for info in archive.infolist())
        if held > _MAX_ZIP_EXPANSION * size + (1 << 20):
            # torch.save stores entries uncompressed; a re-zipped checkpoint of floats shrinks
            # little, a deflate bomb a thousandfold.
            raise _Bad(f"refuses to load: its zip entries expand to {held} bytes from a file of"
                       f" {size} (memory-bomb guard)")
        names = archive.namelist()
        pickles = [n for n in names
                   if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            if any(n.endswith("constants.pkl") for n in names):
                raise _Bad("is a TorchScript archive (torch.jit.save), not a torch.save"
                           " checkpoint; save model.state_dict() with torch.save instead")
            if not pickles:
                raise _Bad("is a zip archive without data.pkl: not a PyTorch checkpoint")
            raise _Bad(f"is a zip archive with several data.pkl records ({_short(pickles)})")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise _Bad("is a TorchScript archive (torch.jit.save), not a torch.save checkpoint;"
                       " save model.state_dict() with torch.save instead")
        byteorder = "little"  # torch's default when the record is absent
        if prefix + "byteorder" in names:
            byteorder = _read_entry(archive, prefix + "byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise _Bad(f"unknown byte order {_short(byteorder)}")
        storages: dict[str, _Storage] = {}

        def load_storage(stype: _StorageType, key: str, numel: int, view) -> _Storage:
            if view is not None:
                raise _Bad("corrupt pickle (a legacy storage view inside a zip checkpoint)")
            if key in storages:
                return storages[key]
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise _Bad(f"storage {_short(name)} is missing from the archive") from None
            nbytes = numel * stype.dtype.np.itemsize
            if nbytes > info.file_size:  # checked before anything is read or allocated
                raise _Bad(f"storage {_short(name)} declares {nbytes} bytes but the archive"
                           f" holds {info.file_size} (truncated or forged)")
            raw = _read_entry(archive, name)
            if len(raw) < nbytes:
                raise _Bad(f"storage {_short(name)} is truncated ({len(raw)} of {nbytes} bytes)")
            storages[key] = _Storage(stype, numel, raw[:nbytes], byteorder)
            return storages[key]

        data = _read_entry(archive, pickles[0])
        return _unpickle(io.BytesIO(data), load_storage, _BUDGET_FACTOR * held + _BUDGET_SLACK)


# ---------------------------------------------------------------------------- legacy format


def _load_legacy(path: Path, size: int):
    budget = _BUDGET_FACTOR * size + _BUDGET_SLACK
    # An mmap as the file: its reads never return (or allocate) more than the file holds.
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as f:
        magic = _unpickle(f, None)
        if type(magic) is not int or magic != _MAGIC_NUMBER:
            raise _Bad("is a pickle but not a torch.save checkpoint (no PyTorch magic number)")
        version = _unpickle(f, None)
        if version != _PROTOCOL_VERSION:
            raise _Bad(f"unsupported legacy PyTorch protocol version {_short(version)}")
        _unpickle(f, None)  # sys_info: storages are little-endian whatever it says
        start = f.tell()

        # Pass 1: unpickle to learn each storage's type and size, which locate the storage
        # bytes behind the pickle; the tensors are validated but not built.
        declared: dict[str, tuple[_StorageType, int]] = {}

        def declare(stype: _StorageType, key: str, numel: int, view) -> _Storage:
            stype, numel = declared.setdefault(key, (stype, numel))  # the first one counts
            nbytes = numel * stype.dtype.np.itemsize
            if nbytes > size:  # checked before anything is read or allocated
                raise _Bad(f"storage {_short(key)} declares {nbytes} bytes, more than the whole"
                           f" file ({size} bytes): truncated or forged")
            return _legacy_view(_Storage(stype, numel, None), view, {})

        _unpickle(f, declare, budget)
        end = f.tell()
        keys = _unpickle(f, None)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _Bad(f"corrupt storage key list {_short(keys)}")
        offsets: dict[str, int] = {}
        position = f.tell()
        for key in keys:
            if key not in declared or key in offsets:
                raise _Bad(f"corrupt storage key list (key {_short(key)})")
            stype, numel = declared[key]
            header = f.read(8)
            if len(header) < 8:
                raise _Bad(f"is truncated: storage {_short(key)} is missing")
            (count,) = struct.unpack("<q", header)
            if count != numel:
                raise _Bad(f"storage {_short(key)} holds {count} elements but the pickle"
                           f" declares {numel} (corrupt)")
            nbytes = numel * stype.dtype.np.itemsize
            if position + 8 + nbytes > size:
                raise _Bad(f"is truncated: storage {_short(key)} needs {nbytes} bytes, only"
                           f" {size - position - 8} remain")
            offsets[key] = position + 8
            position += 8 + nbytes
            f.seek(position)
        missing = sorted(set(declared) - set(offsets))
        if missing:
            raise _Bad(f"storage {_short(missing[0])} has no data (truncated or corrupt)")

        # Pass 2: the same pickle again, now with each storage's bytes read once, on first use.
        f.seek(start)
        pickled = f.read(end - start)
        roots: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def load_storage(stype: _StorageType, key: str, numel: int, view) -> _Storage:
            if key not in roots:
                stype, numel = declared[key]
                f.seek(offsets[key])
                raw = f.read(numel * stype.dtype.np.itemsize)
                roots[key] = _Storage(stype, numel, raw)
            return _legacy_view(roots[key], view, views)

        return _unpickle(io.BytesIO(pickled), load_storage, budget)


def _legacy_view(root: _Storage, view, views: dict[str, _Storage]) -> _Storage:
    """The storage itself, or the (view_key, offset, size) slice old PyTorch versions saved."""
    if view is None:
        return root
    if not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[0], str):
        raise _Bad(f"corrupt pickle (storage view {_short(view)})")
    key, offset, numel = view[0], _count(view[1], "view offset"), _count(view[2], "view size")
    if offset + numel > root.numel:
        raise _Bad(f"corrupt pickle (storage view {_short(view)} outside its storage of"
                   f" {root.numel} elements)")
    if key not in views:
        itemsize = root.stype.dtype.np.itemsize
        raw = None if root.raw is None else root.raw[offset * itemsize:(offset + numel) * itemsize]
        views[key] = _Storage(root.stype, numel, raw)
    return views[key]


# ------------------------------------------------------------------------------ safetensors


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Bad("safetensors header names a tensor twice")
    return dict(pairs)


def _load_safetensors(path: Path, size: int) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise _Bad(f"is truncated: the safetensors header needs {length} bytes, only"
                       f" {size - 8} remain")
        try:
            header = json.loads(f.read(length).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise _Bad(f"corrupt safetensors header ({_short(str(error))})") from None
        start = 8 + length
        available = size - start
        tensors: dict[str, np.ndarray] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                if not isinstance(entry, dict):
                    raise _Bad("corrupt safetensors header (__metadata__ is not an object)")
                continue
            tensors[name] = _safetensor(f, name, entry, start, available)
        return tensors


def _safetensor(f, name: str, entry, start: int, available: int) -> np.ndarray:
    where = f"safetensors tensor {_short(name)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _Bad(f"{where}: needs dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _SAFETENSORS_DTYPES:
        raise _Bad(f"{where}: unsupported dtype {_short(code)}")
    dtype = _DTYPES[_SAFETENSORS_DTYPES[code]]
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(type(n) is int and 0 <= n <= _MAX_DIM for n in shape)):
        raise _Bad(f"{where}: bad shape {_short(shape)}")
    shape = tuple(shape)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _Bad(f"{where}: bad data_offsets {_short(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.np.itemsize
    if end - begin != nbytes:
        raise _Bad(f"{where}: data_offsets span {end - begin} bytes, its shape {list(shape)}"
                   f" and dtype {code} need {nbytes}")
    if end > available:
        raise _Bad(f"{where}: data ends at byte {end} of a buffer of {available} (truncated?)")
    f.seek(start + begin)
    raw = f.read(nbytes)
    if len(raw) < nbytes:
        raise _Bad(f"{where}: is truncated")
    if nbytes == 0:
        try:
            return np.zeros(shape, dtype.np)
        except ValueError as error:  # e.g. (0, 2**62, 2**62): "array is too big"
            raise _Bad(f"{where}: bad shape {list(shape)} ({error})") from None
    storage = _Storage(_StorageType("safetensors", dtype.name), math.prod(shape), raw)
    contiguous = [0] * len(shape)
    step = 1
    for axis in reversed(range(len(shape))):
        contiguous[axis] = step
        step *= shape[axis]
    return storage.tensor(dtype, 0, shape, tuple(contiguous))
