"""The source folders ``store/``, ``kernels/`` and ``agents/`` under their bare names.

They install as ``kvcomm.store``, ``kvcomm.kernels`` and ``kvcomm.agents`` (pyproject's
package-dir). A Python started in a clone's root (a REPL, ``python -c``, ``python -m``) has the
root on ``sys.path``, so a bare ``import kernels`` (transformers 5 imports the Hugging Face
``kernels`` package, one of its requirements) or ``import agents`` (openai-agents' package) finds
the folder before the installed package, and fails or runs the wrong code. Each folder's
``__init__`` calls :func:`hand_over` when imported under its bare name.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> bool:
    """Put the package ``name`` found on ``sys.path`` past the clone's root (where ``init_file``'s
    folder sits) into ``sys.modules[name]``, executed; an ``import`` statement returns what
    ``sys.modules`` holds when the module's own code ends. False (nothing done) where no other
    package of that name is installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        return False
    installed = importlib.util.module_from_spec(spec)
    sys.modules[name] = installed
    try:
        spec.loader.exec_module(installed)
    except BaseException:
        del sys.modules[name]
        raise
    return True


__all__ = ["hand_over"]
