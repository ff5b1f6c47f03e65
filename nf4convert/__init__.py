"""nf4convert: safetensors checkpoints to bitsandbytes-compatible NF4, a versioned format, and a loader.

    import nf4convert
    nf4convert.convert("./Llama-3-8B", "./Llama-3-8B-nf4", options=nf4convert.Options(blocksize=64))
    model = nf4convert.load_model("./Llama-3-8B-nf4", device="cuda")

Importing needs neither bitsandbytes nor transformers: the loader imports them when called.
"""

__version__ = "0.1.0"

from .convert import convert, plan_conversion, resolve_source  # noqa: E402
from .dequantize import dequantize_folder  # noqa: E402
from .hub import push  # noqa: E402
from .load import load_model, load_state_dict, replace_linear  # noqa: E402
from .plan import Options  # noqa: E402
from .quantize import dequantize, quantize_weight  # noqa: E402
from .read import open_checkpoint  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = [
    "__version__", "convert", "plan_conversion", "resolve_source", "dequantize_folder", "push",
    "load_model", "load_state_dict", "replace_linear", "Options", "dequantize", "quantize_weight",
    "open_checkpoint", "verify",
]
