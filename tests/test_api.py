"""The package's public surface: importing and converting need neither bitsandbytes nor transformers."""

from __future__ import annotations

import subprocess
import sys


def test_import_and_convert_without_bitsandbytes_or_transformers(tmp_path):
    code = f"""
import sys
sys.modules["bitsandbytes"] = None
sys.modules["transformers"] = None
import torch
from safetensors.torch import save_file
import nf4convert
save_file({{"layer.weight": torch.randn(64, 128)}}, r"{tmp_path}/w.safetensors")
out = nf4convert.convert(r"{tmp_path}/w.safetensors", r"{tmp_path}/out", options=nf4convert.Options(blocksize=32))
print(nf4convert.verify(out)["ok"], sorted(nf4convert.open_checkpoint(out).quant_states))
try:
    nf4convert.load_model(out)
except nf4convert.errors.MissingDependencyError as e:
    print(e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "True ['layer.weight']"
    assert lines[1] == "load_model needs transformers and accelerate: pip install 'nf4convert[load]'"
