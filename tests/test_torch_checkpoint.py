"""torch_checkpoint: PyTorch (zip and legacy) and safetensors files read without torch, safely.

Files are written by real ``torch.save`` (torch is imported here, in the tests only) and, for
the cases torch cannot produce (forged strides, storages, globals), by a small pickle writer.
"""

from __future__ import annotations

import builtins
import collections
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from her2jax.errors import Her2jaxError
from her2jax.models.torch_checkpoint import load_state, sha256

SERIALISATIONS = ["zip", "legacy"]


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def save(torch, obj, path: Path, serialisation: str, **kwargs) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=serialisation == "zip", **kwargs)
    return path


def assert_same(ours, tensor) -> None:
    """Exactly the tensor: dtype, shape, values; a writeable C-contiguous array."""
    import torch

    assert isinstance(ours, np.ndarray)
    assert ours.flags.c_contiguous and ours.flags.writeable
    tensor = tensor.detach().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        assert ours.dtype == ml_dtypes.bfloat16
        expected = tensor.float().numpy()
        ours = ours.astype(np.float32)
    elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert ours.dtype == getattr(ml_dtypes, str(tensor.dtype).removeprefix("torch."))
        expected = tensor.float().numpy()
        ours = ours.astype(np.float32)
    else:
        expected = tensor.numpy()
        assert ours.dtype == expected.dtype
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def assert_refused(path: Path, *fragments: str) -> Her2jaxError:
    """load_state raises one line naming the file and every fragment of the reason."""
    with pytest.raises(Her2jaxError) as caught:
        load_state(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert caught.value.file == str(path)
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


# ------------------------------------------------------------------------- round trips


def state_dict_of_dtypes(torch) -> collections.OrderedDict:
    g = torch.Generator().manual_seed(1)
    return collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f64=torch.randn(2, 3, dtype=torch.float64, generator=g),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 2, 2, generator=g).bfloat16(),
        i64=torch.randint(-2**40, 2**40, (4,), generator=g),
        i32=torch.randint(-2**30, 2**30, (4,), dtype=torch.int32, generator=g),
        i16=torch.randint(-2**14, 2**14, (3,), dtype=torch.int16, generator=g),
        i8=torch.randint(-100, 100, (3,), dtype=torch.int8, generator=g),
        u8=torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        mask=torch.randn(6, generator=g) > 0,
        scalar=torch.tensor(2.5),
        count=torch.tensor(7),
        empty=torch.zeros(0, 3),
    )


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
@pytest.mark.parametrize("protocol", [2, 4])
def test_state_dict_of_every_dtype(torch, tmp_path, serialisation, protocol):
    state = state_dict_of_dtypes(torch)
    path = save(torch, state, tmp_path / "state.pth", serialisation, pickle_protocol=protocol)
    loaded = load_state(path)
    assert type(loaded) is collections.OrderedDict
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        assert_same(loaded[key], tensor)


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_nested_checkpoint_keeps_python_values(torch, tmp_path, serialisation):
    weights = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    checkpoint = {"state_dict": weights, "epoch": 3, "arch": "vit", "best": 0.75,
                  "flags": [True, None, (1, "two")], "tags": {"a", "b"}, "frozen": frozenset({1}),
                  "blob": b"\x00\xffbytes", "shape": torch.Size([2, 3]),
                  "optimizer": {"state": {0: {"step": torch.tensor(5.0)}},
                                "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]}}
    loaded = load_state(save(torch, checkpoint, tmp_path / "ckpt.pth.tar", serialisation))
    assert loaded.keys() == checkpoint.keys()
    assert (loaded["epoch"], loaded["arch"], loaded["best"]) == (3, "vit", 0.75)
    assert loaded["flags"] == [True, None, (1, "two")]
    assert loaded["tags"] == {"a", "b"} and loaded["frozen"] == frozenset({1})
    assert loaded["blob"] == b"\x00\xffbytes"
    assert loaded["shape"] == (2, 3)
    assert loaded["optimizer"]["param_groups"] == checkpoint["optimizer"]["param_groups"]
    assert_same(loaded["optimizer"]["state"][0]["step"], torch.tensor(5.0))
    for key, tensor in weights.items():
        assert_same(loaded["state_dict"][key], tensor)


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_views_sharing_one_storage(torch, tmp_path, serialisation):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = {
        "base": base,
        "row": base[1],                       # offset 20
        "columns": base[:, 1:3],              # non-contiguous
        "transposed": base.transpose(0, 2),
        "strided": base[..., ::2],
        "flat_slice": base.flatten()[7:19],   # flatten of a contiguous tensor is a view
        "element": base[2, 3, 4],             # 0-d, offset 59
        "permuted": base.permute(2, 0, 1)[1:, :, 2],
        "expanded": torch.arange(4.0).reshape(1, 4).expand(3, 4),  # stride 0
        "empty_view": base[:, 4:4],
    }
    loaded = load_state(save(torch, views, tmp_path / "views.pth", serialisation))
    for key, tensor in views.items():
        assert_same(loaded[key], tensor)
    arrays = list(loaded.values())  # each array has memory of its own
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_module_state_dict(torch, tmp_path, serialisation):
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    model.train()
    model(torch.randn(2, 1, 5, 5, 5))  # moves the BatchNorm statistics and the counter
    state = model.state_dict()
    loaded = load_state(save(torch, state, tmp_path / "model.pt", serialisation))
    assert list(loaded) == list(state)
    assert loaded["1.num_batches_tracked"].shape == () and loaded["1.num_batches_tracked"] == 1
    assert loaded["1.num_batches_tracked"].dtype == np.int64
    for key, tensor in state.items():
        assert_same(loaded[key], tensor)
    assert loaded._metadata == state._metadata  # the OrderedDict's state (BUILD) survives


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_parameters_tensor_attributes_and_new_dtypes(torch, tmp_path, serialisation):
    tagged = torch.randn(3)
    tagged.note = "kept by torch, dropped here"
    stateful = torch.nn.Parameter(torch.randn(2))
    stateful.extra = 1
    objects = {
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "stateful_parameter": stateful,                      # _rebuild_parameter_with_state
        "tagged": tagged,                                    # _rebuild_from_type_v2
        "negated": torch.randn(4)._neg_view(),               # metadata {"neg": True}
        "u16": torch.tensor([1, 2, 65535]).to(torch.uint16),  # _rebuild_tensor_v3 + dtype
        "u32": torch.tensor([7, 2**32 - 1]).to(torch.uint32),
        "f8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "f8e5": torch.tensor([0.25, 57344.0]).to(torch.float8_e5m2),
    }
    loaded = load_state(save(torch, objects, tmp_path / "objects.pth", serialisation))
    for key, tensor in objects.items():
        assert_same(loaded[key], tensor)


def test_gpu_storage_names_and_storage_views_of_old_pytorch(tmp_path):
    # Legacy files saved from CUDA tensors name torch.cuda.FloatStorage, and PyTorch < 1.0
    # could save storage views (view_key, offset, size); torch cannot write either today.
    values = np.arange(10, dtype="<f4")
    obj = {
        "gpu": tensor_v2("cuda.FloatStorage", "root", 10, 2, (2, 2), (2, 1), location="cuda:0"),
        "view": rebuild("_rebuild_tensor_v2",
                        PersId("storage", G("torch.FloatStorage"), "root", "cuda:0", 10,
                               ("view", 4, 5)), 1, (3,), (1,), False, OrderedDictCall()),
    }
    path = craft_legacy(tmp_path / "old.pth", obj, {"root": (4, values.tobytes())})
    loaded = load_state(path)
    np.testing.assert_array_equal(loaded["gpu"], [[2, 3], [4, 5]])
    np.testing.assert_array_equal(loaded["view"], [5, 6, 7])


def test_big_endian_zip(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=">f4")
    halves = np.array([1.0, -0.5], dtype=">u2")  # raw bfloat16 words
    halves[:] = np.array([1.0, -0.5], dtype=ml_dtypes.bfloat16).view(np.uint16)
    obj = {"x": tensor_v2("FloatStorage", "0", 3, 0, (3,), (1,)),
           "h": tensor_v2("BFloat16Storage", "1", 2, 0, (2,), (1,)),
           "b": tensor_v2("BoolStorage", "2", 3, 0, (3,), (1,))}
    path = craft_zip(tmp_path / "big.pth", obj,
                     {"0": values.tobytes(), "1": halves.astype(">u2").tobytes(),
                      "2": b"\x00\x01\x07"}, byteorder="big")
    loaded = load_state(path)
    assert loaded["x"].dtype == np.float32 and loaded["x"].dtype.isnative
    np.testing.assert_array_equal(loaded["x"], [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(loaded["h"].astype(np.float32), [1.0, -0.5])
    np.testing.assert_array_equal(loaded["b"], [False, True, True])


@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_views_round_trip(data):
    import tempfile

    torch = pytest.importorskip("torch")
    shape = data.draw(st.lists(st.integers(0, 4), max_size=4), label="shape")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    base = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    view = base
    if view.ndim:
        index = []
        for size in view.shape:
            start = data.draw(st.integers(0, size), label="start")
            step = data.draw(st.integers(1, 3), label="step")
            index.append(data.draw(st.sampled_from(
                [slice(start, None, step)] + ([start] if start < size else [])), label="index"))
        view = view[tuple(index)]
    if view.ndim >= 2 and data.draw(st.booleans(), label="transpose"):
        view = view.transpose(0, view.ndim - 1)
    serialisation = data.draw(st.sampled_from(SERIALISATIONS), label="serialisation")
    with tempfile.TemporaryDirectory() as tmp:
        path = save(torch, {"view": view, "base": base}, Path(tmp) / "v.pth", serialisation)
        loaded = load_state(path)
    assert_same(loaded["view"], view)
    assert_same(loaded["base"], base)


# ---------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, arrays: dict, *, metadata=None, header=None,
                      cut: int | None = None) -> Path:
    """A safetensors file by hand (struct + json); ``header`` overrides the computed one."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.float64): "F64", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
    computed, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        raw = np.ascontiguousarray(array).tobytes()
        computed[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                          "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata is not None:
        computed["__metadata__"] = metadata
    text = json.dumps(computed if header is None else header).encode()
    blob = struct.pack("<Q", len(text)) + text + b"".join(chunks)
    path.write_bytes(blob if cut is None else blob[:cut])
    return path


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f16": rng.standard_normal(4).astype(np.float16),
        "f64": rng.standard_normal(2),
        "bf16": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        "i64": np.array([-(2**40), 5]), "i32": np.array([1, -2], np.int32),
        "i16": np.array([3], np.int16), "i8": np.array([-4], np.int8),
        "u8": np.array([255], np.uint8), "mask": np.array([True, False]),
        "scalar": np.array(1.25, np.float32), "empty": np.zeros((0, 5), np.float32),
    }
    loaded = load_state(write_safetensors(tmp_path / "m.safetensors", arrays,
                                          metadata={"format": "pt"}))
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
        np.testing.assert_array_equal(loaded[name], array)


def good_entry(**overrides) -> dict:
    return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **overrides}


@pytest.mark.parametrize("header, fragment", [
    ({"x": good_entry(dtype="C64")}, "unsupported dtype"),
    ({"x": good_entry(shape=[3])}, "need 12"),
    ({"x": good_entry(shape=[-2])}, "bad shape"),
    ({"x": good_entry(shape="2")}, "bad shape"),
    ({"x": good_entry(shape=[0, 2**62, 2**62], data_offsets=[0, 0])}, "bad shape"),
    ({"x": good_entry(data_offsets=[8, 0])}, "data_offsets"),
    ({"x": good_entry(data_offsets=[8, 16])}, "truncated"),
    ({"x": good_entry(data_offsets=[0, 8, 9])}, "data_offsets"),
    ({"x": {"dtype": "F32"}}, "needs dtype, shape and data_offsets"),
    ({"x": good_entry(), "__metadata__": ["not", "a", "dict"]}, "__metadata__"),
    ({"x": 5}, "needs dtype, shape and data_offsets"),
])
def test_safetensors_malformed_header(tmp_path, header, fragment):
    path = write_safetensors(tmp_path / "bad.safetensors", {"x": np.ones(2, np.float32)},
                             header=header)
    assert_refused(path, fragment)


def test_safetensors_broken_bytes(tmp_path):
    good = write_safetensors(tmp_path / "good.safetensors", {"x": np.ones(4, np.float32)})
    blob = good.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: 8 + length // 2])
    assert_refused(cut, "truncated", "header")
    short_data = tmp_path / "short.safetensors"
    short_data.write_bytes(blob[:-4])
    assert_refused(short_data, "truncated")
    twice = tmp_path / "twice.safetensors"
    text = b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},' \
           b' "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    twice.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    assert_refused(twice, "twice")
    not_json = tmp_path / "notjson.safetensors"
    not_json.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    assert_refused(not_json, "corrupt safetensors header")


# --------------------------------------------------------------------------------- safety


class Evil:
    """Its unpickling runs ``func(*args)``, as a malicious checkpoint's would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(target: Path) -> dict[str, tuple[object, str]]:
    """name -> (object whose unpickling would create ``target``, the global it references)."""
    def qualified(func) -> str:
        return f"{func.__module__}.{func.__name__}"

    return {
        "os.system": (Evil(os.system, f"touch {target}"), qualified(os.system)),
        "builtins.exec": (Evil(builtins.exec, f"open({str(target)!r}, 'w').close()"),
                          "builtins.exec"),
        "subprocess.call": (Evil(subprocess.call, ["touch", str(target)]), "subprocess.call"),
        "nested": ({"state_dict": {"w": [1.0], "deep": {"x": Evil(os.system, f"touch {target}")}}},
                   qualified(os.system)),
    }


def test_payloads_are_live(tmp_path):
    """The payloads below do run code under plain pickle (so their refusal means something)."""
    target = tmp_path / "pwned"
    for obj, _ in payloads(target).values():
        pickle.loads(pickle.dumps(obj, protocol=2))
        assert target.exists()
        target.unlink()


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "subprocess.call", "nested"])
@pytest.mark.parametrize("container", ["pickle2", "pickle4", "zip", "legacy"])
def test_code_in_pickle_is_refused(torch, tmp_path, name, container):
    target = tmp_path / "pwned"
    obj, global_name = payloads(target)[name]
    path = tmp_path / "checkpoint.pth"
    if container.startswith("pickle"):
        path.write_bytes(pickle.dumps(obj, protocol=int(container[-1])))
    else:
        state = {"state_dict": {"w": torch.ones(2)}, "payload": obj}
        save(torch, state, path, container)
    assert_refused(path, "refuses to load", f"references {global_name}", "allow-list",
                   "could run code")
    assert not target.exists()


@pytest.mark.parametrize("obj, global_name", [
    (__import__("argparse").Namespace(lr=0.1), "argparse.Namespace"),
    (np.arange(3), "_reconstruct"),
    (Path("x"), "pathlib"),
])
def test_harmless_but_unlisted_globals_are_refused(torch, tmp_path, obj, global_name):
    path = save(torch, {"args": obj, "w": torch.ones(1)}, tmp_path / "c.pth", "zip")
    assert_refused(path, "refuses to load", global_name)


def test_whole_pickled_module_is_refused(torch, tmp_path):
    model = torch.nn.Linear(2, 2)
    for serialisation in SERIALISATIONS:
        path = save(torch, model, tmp_path / f"model-{serialisation}.pth", serialisation)
        assert_refused(path, "refuses to load", "torch.nn.modules.linear.Linear")


# ---------------------------------------------- forged files: a small pickle writer for them


class G:
    """A global written verbatim into the pickle (GLOBAL opcode), as a forger would."""

    def __init__(self, qualified: str):
        self.module, _, self.name = qualified.rpartition(".")


class Call:
    """``func(*args)`` through the REDUCE opcode."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Build:
    """``obj`` then ``state`` then the BUILD opcode."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class SetItem:
    """``obj[key] = value`` through the SETITEM opcode."""

    def __init__(self, obj, key, value):
        self.obj, self.key, self.value = obj, key, value


class PersId:
    def __init__(self, *pid):
        self.pid = pid


class _Forger(pickle._Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, PersId) else None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, G):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save(obj.func)
            self.save(obj.args)
            self.write(pickle.REDUCE)
        elif isinstance(obj, Build):
            self.save(obj.obj)
            self.save(obj.state)
            self.write(pickle.BUILD)
        elif isinstance(obj, SetItem):
            self.save(obj.obj)
            self.save(obj.key)
            self.save(obj.value)
            self.write(pickle.SETITEM)
        else:
            super().save(obj, save_persistent_id)


def forge(obj) -> bytes:
    buffer = io.BytesIO()
    _Forger(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def OrderedDictCall() -> Call:
    return Call(G("collections.OrderedDict"))


def rebuild(name: str, *args) -> Call:
    return Call(G(f"torch._utils.{name}"), *args)


def tensor_v2(stype: str, key: str, numel: int, offset, size, stride, *, location="cpu",
              metadata=None) -> Call:
    args = (PersId("storage", G(f"torch.{stype}"), key, location, numel), offset, size, stride,
            False, OrderedDictCall())
    return rebuild("_rebuild_tensor_v2", *args, *([metadata] if metadata else []))


def craft_zip(path: Path, obj, storages: dict[str, bytes], *, byteorder: str | None = "little",
              prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", forge(obj))
        if byteorder:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(f"{prefix}/data/{key}", raw)
        archive.writestr(f"{prefix}/version", "3\n")
    return path


def craft_legacy(path: Path, obj, storages: dict[str, tuple[int, bytes]]) -> Path:
    """The legacy layout; ``storages``: key -> (element size, raw bytes)."""
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
             forge(obj), pickle.dumps(sorted(storages), protocol=2)]
    for key in sorted(storages):
        itemsize, raw = storages[key]
        parts.append(struct.pack("<q", len(raw) // itemsize) + raw)
    path.write_bytes(b"".join(parts))
    return path


FLOATS = np.arange(12, dtype="<f4").tobytes()


def test_forged_control_loads(tmp_path):
    """The forger writes valid checkpoints: the refusals below come from the one defect."""
    path = craft_zip(tmp_path / "ok.pth", {"t": tensor_v2("FloatStorage", "0", 12, 1, (2, 3),
                                                          (4, 1))}, {"0": FLOATS})
    np.testing.assert_array_equal(load_state(path)["t"], [[1, 2, 3], [5, 6, 7]])
    path = craft_legacy(tmp_path / "ok-legacy.pth",
                        {"t": tensor_v2("FloatStorage", "k", 12, 0, (2,), (6,))},
                        {"k": (4, FLOATS)})
    np.testing.assert_array_equal(load_state(path)["t"], [0, 6])


@pytest.mark.parametrize("offset, size, stride, fragment", [
    (0, (4, 4), (4, 1), "reaches past its storage"),
    (12, (1,), (1,), "reaches past its storage"),
    (0, (2, 7), (0, 2), "reaches past its storage"),
    (0, (3,), (-1,), "not a count"),
    (-1, (3,), (1,), "not a count"),
    (0, (-3,), (1,), "not a count"),
    (0, (2, 2), (1,), "size (2, 2) with stride (1,)"),
    (0, (2,), "1", "not a shape"),
    (0.5, (2,), (1,), "not a count"),
    (0, (1,) * 65, (1,) * 65, "not a shape"),
    (0, (10**6, 10**6), (0, 0), "memory-bomb"),
])
@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_tensor_arguments_are_validated(tmp_path, serialisation, offset, size, stride,
                                        fragment):
    obj = {"t": tensor_v2("FloatStorage", "0", 12, offset, size, stride)}
    if serialisation == "zip":
        path = craft_zip(tmp_path / "t.pth", obj, {"0": FLOATS})
    else:
        path = craft_legacy(tmp_path / "t.pth", obj, {"0": (4, FLOATS)})
    assert_refused(path, fragment)


def test_storage_larger_than_its_data_is_refused(tmp_path):
    bomb = {"t": tensor_v2("FloatStorage", "0", 10**12, 0, (1,), (1,))}
    assert_refused(craft_zip(tmp_path / "z.pth", bomb, {"0": FLOATS}), "declares", "holds 48")
    assert_refused(craft_legacy(tmp_path / "l.pth", bomb, {"0": (4, FLOATS)}),
                   "more than the whole file")
    short = {"t": tensor_v2("FloatStorage", "0", 13, 0, (1,), (1,))}
    assert_refused(craft_zip(tmp_path / "s.pth", short, {"0": FLOATS}), "truncated or forged")
    assert_refused(craft_legacy(tmp_path / "s-l.pth", short, {"0": (4, FLOATS)}),
                   "holds 12 elements but the pickle declares 13")
    missing = {"t": tensor_v2("FloatStorage", "7", 1, 0, (1,), (1,))}
    assert_refused(craft_zip(tmp_path / "m.pth", missing, {"0": FLOATS}), "missing")


@pytest.mark.parametrize("obj, fragments", [
    # BUILD sets state on an allowed callable, a storage type, a type, a dtype
    (Build(G("torch._utils._rebuild_tensor_v2"), {"fn": 1}), ["set the state of"]),
    (Build(G("torch.FloatStorage"), (None, {"dtype": 1})), ["set the state of"]),
    (Build(G("torch.float32"), {"np": 1}), ["corrupt pickle"]),
    (Build(G("collections.OrderedDict"), {"x": 1}), ["corrupt pickle"]),
    (Build(G("builtins.set"), (None, {"add": 1})), ["corrupt pickle"]),
    # allowed names used as something else
    (Call(G("torch.FloatStorage"), 3), ["corrupt pickle"]),
    (Call(G("torch._tensor._rebuild_from_type_v2"), G("collections.OrderedDict"),
          G("torch.Tensor"), (), {}), ["_rebuild_from_type_v2"]),
    (rebuild("_rebuild_tensor_v2", "not a storage", 0, (1,), (1,), False, None),
     ["tensor storage"]),
    (rebuild("_rebuild_parameter", "not a tensor", False, None), ["a parameter of"]),
    (rebuild("_rebuild_tensor_v3", PersId("storage", G("torch.UntypedStorage"), "0", "cpu", 48),
             0, (2,), (1,), False, None, "float32"), ["tensor dtype"]),
    (Call(G("_codecs.encode"), "x", "rot13"), ["_codecs.encode"]),
    (Call(G("torch.Size"), (2, -1)), ["torch.Size"]),
    (PersId("module", G("torch.FloatStorage"), "file.py", "source"), ["persistent id"]),
    (PersId("storage", "FloatStorage", "0", "cpu", 1), ["storage type"]),
    # tensor types without a numpy equivalent are named
    (tensor_v2("ComplexFloatStorage", "0", 6, 0, (1,), (1,)), ["a complex tensor",
                                                               "ComplexFloatStorage"]),
    (tensor_v2("QInt8Storage", "0", 6, 0, (1,), (1,)), ["a quantized tensor"]),
    (rebuild("_rebuild_qtensor", 1), ["a quantized tensor", "_rebuild_qtensor"]),
    (rebuild("_rebuild_sparse_tensor", 1), ["a sparse tensor"]),
    (rebuild("_rebuild_tensor_v3", PersId("storage", G("torch.UntypedStorage"), "0", "cpu", 48),
             0, (2,), (1,), False, None, G("torch.complex64")), ["a complex tensor"]),
    (tensor_v2("FloatStorage", "0", 12, 0, (2,), (1,), metadata={"conj": True}),
     ["conjugated"]),
    # globals that are not on the list, in torch's own namespace too
    (Call(G("torch.load"), "x"), ["refuses to load", "torch.load"]),
    (Call(G("torch._utils._import_dotted_name"), "os.system"), ["_import_dotted_name"]),
    (Call(G("numpy.core.multiarray._reconstruct"), 1), ["numpy.core.multiarray._reconstruct"]),
    (Call(G("__builtin__.eval"), "1"), ["refuses to load", "builtins.eval"]),
])
def test_forged_pickles_are_refused(tmp_path, obj, fragments):
    assert_refused(craft_zip(tmp_path / "forged.pth", {"x": obj}, {"0": FLOATS}), *fragments)
    # and nothing shared was modified on the way: the same globals still work
    assert not hasattr(collections.OrderedDict, "x")
    good = {"t": tensor_v2("FloatStorage", "0", 12, 0, (2,), (1,)), "d": G("torch.float32")}
    loaded = load_state(craft_zip(tmp_path / "good.pth", good, {"0": FLOATS}))
    np.testing.assert_array_equal(loaded["t"], [0, 1])
    assert repr(loaded["d"]) == "torch.float32"


def test_tensors_are_read_only_while_unpickling(tmp_path):
    """SETITEM on a rebuilt tensor would write into it mid-load (torch pickles never do)."""
    t = tensor_v2("FloatStorage", "0", 12, 0, (2,), (1,))
    assert_refused(craft_zip(tmp_path / "setitem.pth", {"t": SetItem(t, 0, 99.0)},
                             {"0": FLOATS}), "read-only")
    loaded = load_state(craft_zip(tmp_path / "plain.pth", {"t": t}, {"0": FLOATS}))
    loaded["t"][0] = 99.0  # writeable once loaded


def test_python2_names_and_protocol2_builtins(tmp_path):
    obj = {"set": Call(G("__builtin__.set"), [1, 2]),
           "bytes": Call(G("_codecs.encode"), "\u00ff\u0000", "latin1"),
           "dtype": G("torch.bfloat16")}
    loaded = load_state(craft_zip(tmp_path / "py2.pth", obj, {}))
    assert loaded["set"] == {1, 2} and loaded["bytes"] == b"\xff\x00"
    assert repr(loaded["dtype"]) == "torch.bfloat16"


def test_deflated_zip_loads_but_a_deflate_bomb_does_not(torch, tmp_path):
    state = {"w": torch.randn(50, 50), "zeros": torch.zeros(1000)}
    stored = save(torch, state, tmp_path / "stored.pth", "zip")
    with zipfile.ZipFile(stored) as source:
        entries = {name: source.read(name) for name in source.namelist()}
    deflated = tmp_path / "deflated.pth"  # torch.load reads this too
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    loaded = load_state(deflated)
    assert_same(loaded["w"], state["w"])
    assert_same(loaded["zeros"], state["zeros"])
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/data.pkl", forge({"t": tensor_v2("FloatStorage", "0", 5 << 20, 0,
                                                              (5 << 20,), (1,))}))
        archive.writestr("a/data/0", bytes(20 << 20))
    assert bomb.stat().st_size < 100_000
    assert_refused(bomb, "memory-bomb guard")


def test_huge_memo_index_allocates_nothing(tmp_path):
    # LONG_BINPUT 4e9 makes CPython's C unpickler allocate a 32 GB memo table (found by
    # fuzzing this loader); the pure-Python one it uses keeps the memo in a dict.
    body = b"\x80\x02K\x07r" + struct.pack("<I", 4_000_000_000) + b"."
    path = tmp_path / "memo.pth"
    path.write_bytes(zip_bytes({"a/data.pkl": body}))
    assert load_state(path) == 7


@given(seed=st.integers(0, 2**32 - 1), legacy=st.booleans())
@settings(max_examples=150, deadline=None)
def test_mutated_checkpoints_load_or_raise_her2jaxerror(fuzz_files, seed, legacy):
    """Random byte edits of a checkpoint (its pickle, for zip files, as CRCs guard the rest)."""
    rng = np.random.default_rng(seed)
    blob = bytearray(fuzz_files["legacy"] if legacy else fuzz_files["pickle"])
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(blob)))
        action = rng.random()
        if action < 0.6:
            blob[i] = int(rng.integers(256))
        elif action < 0.8:
            del blob[i:i + int(rng.integers(1, 8))]
        else:
            blob[i:i] = rng.integers(0, 256, int(rng.integers(1, 8)), dtype=np.uint8).tobytes()
    path = fuzz_files["dir"] / f"mutated-{seed}-{legacy}.pth"
    path.write_bytes(bytes(blob) if legacy else zip_bytes(
        {**fuzz_files["entries"], fuzz_files["pickle_name"]: bytes(blob)}))
    try:
        load_state(path)
    except Her2jaxError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    state = {"state_dict": {**model.state_dict(), "view": torch.arange(20.0).reshape(4, 5)[1:, ::2],
                            "bf16": torch.randn(3).bfloat16()}, "epoch": 2}
    directory = tmp_path_factory.mktemp("fuzz")
    save(torch, state, directory / "zip.pth", "zip")
    save(torch, state, directory / "legacy.pth", "legacy")
    with zipfile.ZipFile(directory / "zip.pth") as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    pickle_name = next(name for name in entries if name.endswith("/data.pkl"))
    return {"dir": directory, "legacy": (directory / "legacy.pth").read_bytes(),
            "entries": entries, "pickle_name": pickle_name, "pickle": entries[pickle_name]}


# ------------------------------------------------------------------------------ bad files


def nifti_header() -> bytes:
    header = bytearray(352)
    header[:4] = struct.pack("<i", 348)
    header[344:348] = b"n+1\0"
    return bytes(header)


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("storages")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            # A fixed date: the bytes (and the test ids made from them) do not depend on the
            # clock, so pytest-xdist's workers collect the same tests.
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


@pytest.mark.parametrize("content, fragments", [
    (b"", ["is empty"]),
    (b"epoch,auc\n1,0.8\n", ["not a PyTorch or safetensors checkpoint", "text file"]),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), ["not a PyTorch or safetensors checkpoint", "PNG"]),
    (gzip.compress(nifti_header(), mtime=0), ["not a PyTorch or safetensors checkpoint", "gzip"]),
    (nifti_header(), ["not a PyTorch or safetensors checkpoint", "NIfTI"]),
    (bytes(range(256)) * 2, ["not a PyTorch or safetensors checkpoint", "binary"]),
    (pickle.dumps({"weights": [1.0, 2.0]}, protocol=2), ["not a torch.save checkpoint"]),
    (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(999, protocol=2),
     ["protocol version 999"]),
    (zip_bytes({"readme.txt": b"hello"}), ["zip archive without data.pkl"]),
    (zip_bytes({"m/data.pkl": b"x", "m/constants.pkl": b"x"}), ["TorchScript"]),
    (zip_bytes({"a/data.pkl": b"x", "b/data.pkl": b"x"}), ["several data.pkl"]),
    (zip_bytes({"m/data.pkl": pickle.dumps(1), "m/byteorder": b"middle"}),
     ["unknown byte order"]),
    (zip_bytes({"m/data.pkl": b"\x80\x02}q\x00(X"}), ["truncated or corrupt pickle"]),
    (tar_bytes(), ["tar archive", "pre-0.4"]),
    (b"PK\x03\x04" + bytes(40), ["truncated or corrupt zip archive"]),
], ids=["empty", "text", "png", "gzip", "nifti", "binary", "pickle-not-torch",
        "pickle-protocol-999", "zip-without-data-pkl", "zip-torchscript", "zip-several-data-pkl",
        "zip-byte-order", "zip-corrupt-pickle", "tar-legacy", "zip-truncated"])
def test_bad_files(tmp_path, content, fragments):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(content)
    assert_refused(path, *fragments)


def test_missing_and_directory(tmp_path):
    assert_refused(tmp_path / "nope.pth", "not found")
    assert_refused(tmp_path, "is a directory")
    for path, fragment in ((tmp_path / "nope.pth", "not found"), (tmp_path, "directory")):
        with pytest.raises(Her2jaxError, match=fragment):
            sha256(path)


@pytest.mark.parametrize("serialisation", SERIALISATIONS)
def test_truncated_checkpoints(torch, tmp_path, serialisation):
    state = {"state_dict": {"a": torch.randn(64, 64), "b": torch.randn(100)}, "epoch": 1}
    blob = save(torch, state, tmp_path / "full.pth", serialisation).read_bytes()
    messages = []
    for fraction in (0.001, 0.01, 0.05, 0.3, 0.6, 0.9, 0.999):
        path = tmp_path / f"cut-{fraction}.pth"
        path.write_bytes(blob[: max(1, int(len(blob) * fraction))])
        messages.append(str(assert_refused(path)))
    assert all("truncated" in m for m in messages[1:]), messages


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(torch, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.ones(1, 2)), path)
    assert_refused(path, "TorchScript")


def test_sha256(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"her2jax" * 1000)
    assert sha256(path) == hashlib.sha256(b"her2jax" * 1000).hexdigest()
    assert sha256(str(path)) == sha256(path)


# ------------------------------------------------------------------- torch is never imported


def test_load_state_never_imports_torch(torch, tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(4)}}
    zip_path = save(torch, state, tmp_path / "zip.pth", "zip")
    legacy_path = save(torch, state, tmp_path / "legacy.pth", "legacy")
    script = textwrap.dedent(f"""
        import json, sys
        from her2jax.models.torch_checkpoint import load_state
        sums = [float(load_state(p)["state_dict"]["w"].sum()) for p in ({str(zip_path)!r},
                                                                       {str(legacy_path)!r})]
        print(json.dumps({{"sums": sums, "torch": "torch" in sys.modules,
                          "torch_any": sorted(m for m in sys.modules if m.startswith("torch"))}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sums"] == [15.0, 15.0]
    assert report["torch"] is False and report["torch_any"] == []
