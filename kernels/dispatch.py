"""Backend choice for every kernel op: the Triton kernel or its torch reference.

Precedence: the per-call ``backend=`` argument, then :func:`set_backend`, then the environment
variable ``KVCOMM_KERNELS``, then ``"auto"``.

- ``"auto"``: Triton when the tensors are on CUDA and Triton imports, else the torch reference.
- ``"triton"``: always the Triton kernel; CPU tensors are accepted only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``import kvcomm.kernels``), which is how the
  tests run the kernels without a GPU. Otherwise a :class:`~kvcomm.errors.KernelError`.
- ``"torch"``: always the reference.
"""

from __future__ import annotations

import os

import torch

from kvcomm.errors import KernelError
from kvcomm.kernels._triton import HAS_TRITON, INTERPRET

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KVCOMM_KERNELS"

_state: dict[str, str | None] = {"backend": None}


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise KernelError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` returns to ``KVCOMM_KERNELS``/"auto")."""
    _state["backend"] = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The default backend now in force: set_backend's, else ``$KVCOMM_KERNELS``, else "auto"."""
    if _state["backend"] is not None:
        return _state["backend"]
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return "auto"
    return _check_name(env, f"environment variable {ENV_VAR}")


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernel (False: the torch reference).

    Raises:
        KernelError: an unknown backend name, or "triton" forced where it cannot run.
    """
    name = get_backend() if backend is None else _check_name(backend, "backend")
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise KernelError("backend 'triton' was requested but triton is not installed")
    if on_cuda or INTERPRET:
        return True
    devices = sorted({str(t.device) for t in tensors})
    raise KernelError(
        f"backend 'triton' needs CUDA tensors (got {', '.join(devices)}); set TRITON_INTERPRET=1 "
        "before importing kvcomm.kernels to run the kernels on CPU through the interpreter"
    )
