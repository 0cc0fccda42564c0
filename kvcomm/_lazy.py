"""One helper for the packages whose public names load on first use (PEP 562 ``__getattr__``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: dict[str, Any], *, needs: str = ""
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to its module.

    A name is imported on first access and then cached in the package's ``namespace`` (its
    ``globals()``). ``needs`` names the optional dependencies, for an ImportError that says what
    to install.
    """

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            if not needs:
                raise
            raise ImportError(f"{package}.{name} needs {needs} (pip install {needs}): {exc}") from exc
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(namespace.get("__all__", names))

    return getattr_, dir_
