"""The constants of the nf4convert on-disk format, version 1.

`spec/FORMAT.md` is the normative description; every table in it that lists a
value defined here is checked against this module by `tests/test_spec.py`.
The reader, the writer and the quantizer import this module, never each other.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_NAME = "nf4convert"
FORMAT_VERSION = 1
#: Format versions a reader of this package accepts.
SUPPORTED_VERSIONS = (1,)

MANIFEST_NAME = "nf4convert.json"
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class WeightFiles:
    """How a library names a model's weights files: one file, numbered shards, and their index."""

    single: str
    template: str
    index: str

    def names(self, count: int) -> list[str]:
        """The shard names of a model written in ``count`` shards."""
        return [self.single] if count == 1 else [self.template.format(index=i + 1, count=count) for i in range(count)]


#: transformers' names (and sentence-transformers').
TRANSFORMERS_FILES = WeightFiles(SINGLE_SHARD_NAME, SHARD_NAME_TEMPLATE, INDEX_NAME)
#: diffusers' names for a model (a pipeline component).
DIFFUSERS_FILES = WeightFiles(
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors", "diffusion_pytorch_model.safetensors.index.json"
)
#: Every index name a reader looks for.
INDEX_NAMES = (TRANSFORMERS_FILES.index, DIFFUSERS_FILES.index)


def weight_files(config: dict | None) -> WeightFiles:
    """The weights file names of the library whose ``config.json`` this is: diffusers' for a diffusers
    model (``_class_name`` and ``_diffusers_version``), else transformers'."""
    is_diffusers = isinstance(config, dict) and isinstance(config.get("_class_name"), str) and "_diffusers_version" in config
    return DIFFUSERS_FILES if is_diffusers else TRANSFORMERS_FILES
#: The hidden file in each folder ``dequantize`` writes: JSON ``{"files": [names]}``, what it wrote there
#: (a ``convert`` output's manifest lists its files).
OUTPUT_MARK = ".nf4convert-output"
#: A diffusers pipeline's index of its components (each in a subfolder of its name).
PIPELINE_INDEX = "model_index.json"
#: The report ``nf4convert verify --save`` writes into a folder; the card quotes its summary.
VERIFY_REPORT = "nf4convert-verify.json"

#: Keys of every shard's safetensors `__metadata__`.
METADATA = {"format": "pt", "nf4convert.format": FORMAT_NAME, "nf4convert.version": str(FORMAT_VERSION)}

#: The 16 NF4 code values (float32), QLoRA's normal-quantiles table as bitsandbytes ships it.
#: Index 7 is exactly 0.0 and index 15 exactly 1.0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

#: Block sizes (elements per absmax) that bitsandbytes accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
#: Quantizer kernels (``--kernel``): all give the same bytes.
KERNELS = ("auto", "native", "eager")
#: What happens to MoE expert weights (``--experts``): quantized per expert, or kept as transformers 5 keeps them.
EXPERT_MODES = ("quantize", "keep")
#: How each block's scale is chosen (``--scales``, spec section 2.6): its absmax (bitsandbytes' rule,
#: bit-exact), or a search for the scale of least squared error.
SCALE_METHODS = ("absmax", "search")
#: ``--bits``: the range of a size budget, in bits per parameter of the weights that would be quantized
#: (NF4 at blocksize 64 with double quantization, to 16-bit weights).
BUDGET_BITS = (4.127, 16.0)
#: The search's candidate scales, as factors of the block's absmax: the codes of the best one are refitted
#: by least squares (spec section 2.6).
SEARCH_GRID = (1.05, 1.0, 0.9)
#: Blocks whose absmax is below this keep the absmax encoding (their reciprocal would overflow).
SEARCH_MIN_SCALE = 1e-30
#: Block size of the second-level (8-bit) quantization of absmax.
NESTED_BLOCKSIZE = 256
#: Scales are divided by max(absmax, ABSMAX_FLOOR) (float32), so an all-zero block is defined.
ABSMAX_FLOOR = 1e-38

#: bitsandbytes' signed dynamic 8-bit map, `create_dynamic_map(signed=True)`: 256 sorted float32 values.
DYNAMIC_MAP = (
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
)

#: bitsandbytes' FP4 code table (``get_4bit_type("fp4")``): read in bitsandbytes folders that transformers
#: saved (``nf4convert inspect | verify | dequantize``), never written.
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
#: 4-bit types -> code tables: nf4convert writes NF4; bitsandbytes folders may hold FP4.
CODE_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}

#: Suffixes of the tensors that together hold one quantized weight `<module>.weight`.
QUANT_STATE_SUFFIXES = {quant_type: f"quant_state.bitsandbytes__{quant_type}" for quant_type in CODE_TABLES}
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", *QUANT_STATE_SUFFIXES.values())

#: Floating dtypes a weight may have to be quantized, as spelled by safetensors and by bitsandbytes' blob.
QUANTIZABLE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

#: safetensors dtype -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Largest safetensors header a reader accepts (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
