"""nf4convert: safetensors checkpoints to bitsandbytes-compatible NF4, a versioned format, and a loader.

    import nf4convert
    nf4convert.convert("./Llama-3-8B", "./Llama-3-8B-nf4", options=nf4convert.Options(blocksize=64))
    model = nf4convert.load_model("./Llama-3-8B-nf4", device="cuda")

The public names load on first use: importing the package (or starting the CLI) does not import
torch, so `nf4convert inspect` and `--help` answer at once, planning without transformers needs no
torch, and neither does a conversion in the native kernel (nf4convert.arrays). Importing needs neither bitsandbytes nor transformers at all: the loader imports them when called.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.3.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "convert": "convert", "plan_conversion": "convert", "resolve_source": "resolve", "dequantize_folder": "dequantize",
    "push": "hub", "load_model": "load", "load_state_dict": "load", "replace_linear": "load", "Options": "plan",
    "dequantize": "quantize", "quantize_weight": "quantize", "open_checkpoint": "read", "verify": "verify",
}  # fmt: skip
__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on its package; where a public function has the
        # submodule's name (convert, verify, dequantize), the function keeps the name.
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_EXPORTS})


sys.modules[__name__].__class__ = _Package
