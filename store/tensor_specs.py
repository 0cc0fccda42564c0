"""The ``tensors`` list of an entry header: the dtypes it may name, and its validation.

Each ``tensors`` item: ``{name, dtype, shape, codec, offset, nbytes, scale}``. ``dtype`` and
``shape`` are the logical (decoded) ones. ``codec == "raw"``: ``nbytes`` bytes of ``dtype``.
``codec == "int8"``: ``nbytes`` int8 values of ``shape`` then ``scale = {shape, offset, nbytes}``
float32 scales of shape ``[..., 1, D]`` (keys) or ``[..., T, 1]`` (values); value = q * scale.
Offsets are relative to the payload start (:mod:`kvcomm.store.framing`), each the next aligned
one after the previous part.

:func:`check_specs` runs before anything is allocated: dtype and codec whitelists, non-negative
dims each under the limit, byte counts that match, parts in order, a total under the limit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvcomm.errors import EntryFormatError
from kvcomm.store.framing import align

MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1  # per dimension; byte counts bound the product

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}
INT8_FLOATS = ("float32", "float16", "bfloat16")  # what the int8 kernels take


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_part(where: str, shape: Any, itemsize: int, part: dict[str, Any], cursor: int, limit: int) -> int:
    """Validate one byte range; returns the new cursor (end of the part)."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise EntryFormatError("shape", f"{where}: shape {shape!r} is not a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}]")
    offset: Any = part.get("offset")
    nbytes: Any = part.get("nbytes")
    if not (_is_int(offset) and _is_int(nbytes)) or nbytes < 0:
        raise EntryFormatError("corrupt", f"{where}: offset/nbytes {offset!r}/{nbytes!r} are not non-negative ints")
    if offset != align(cursor):
        raise EntryFormatError("corrupt", f"{where}: offset {offset} is not the next aligned offset {align(cursor)}")
    if offset + nbytes > limit:
        raise EntryFormatError("oversize", f"{where}: ends at byte {offset + nbytes}, over the {limit}-byte limit")
    if math.prod(shape) * itemsize != nbytes:  # Python ints: no overflow on absurd shapes
        raise EntryFormatError("shape", f"{where}: shape {shape} x {itemsize} B does not match nbytes {nbytes}")
    return int(offset + nbytes)


def check_specs(specs: list[Any], limit: int) -> int:
    """Validate every tensor spec; returns the payload length they describe."""
    cursor, names = 0, set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or spec["name"] in names:
            raise EntryFormatError("corrupt", f"tensor #{i}: missing or duplicate name")
        name = spec["name"]
        names.add(name)
        dtype, codec = spec.get("dtype"), spec.get("codec")
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or map is unhashable
            raise EntryFormatError("corrupt", f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if codec == "raw":
            cursor = _check_part(f"tensor {name!r}", spec.get("shape"), _ITEMSIZE[dtype], spec, cursor, limit)
        elif codec == "int8":
            if dtype not in INT8_FLOATS or not isinstance(spec.get("scale"), dict):
                raise EntryFormatError("corrupt", f"tensor {name!r}: int8 needs a float16/32 dtype and a scale")
            shape: Any = spec.get("shape")
            scale: dict[str, Any] = spec["scale"]
            cursor = _check_part(f"tensor {name!r}", shape, 1, spec, cursor, limit)
            cursor = _check_part(f"scale of {name!r}", scale.get("shape"), 4, scale, cursor, limit)
            s_shape = scale["shape"]
            if len(shape) < 2 or s_shape not in ([*shape[:-2], 1, shape[-1]], [*shape[:-1], 1]):
                raise EntryFormatError("shape", f"tensor {name!r}: int8 shape {shape} with scale shape {s_shape}: "
                                                "want [..., T, D] with [..., 1, D] or [..., T, 1]")
        else:
            raise EntryFormatError("corrupt", f"tensor {name!r}: unknown codec {codec!r}")
    return cursor


__all__ = ["DTYPES", "DTYPE_NAMES", "INT8_FLOATS", "MAX_DIM", "MAX_NDIM", "check_specs"]
