"""Lazy stage faces: a package ``__init__`` that names its public functions without importing them.

A face imports a name's module only when the name is first used, so
``from cnclip_kd.deploy import Retriever`` loads the torch-free serving code
alone, and ``cnclip_kd.deploy.export_onnx`` brings torch in only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence


def lazy_face(package: str, modules: Mapping[str, Sequence[str]]
              ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """Build a package's module-level ``__getattr__``, ``__dir__`` and ``__all__`` from its exports.

    Args:
        package: The package's ``__name__``.
        modules: Submodule name → the public names the face takes from it.

    Returns:
        ``(__getattr__, __dir__, __all__)`` to assign in the package's ``__init__``.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(set(where) | set(modules))

    return __getattr__, __dir__, sorted(where)
