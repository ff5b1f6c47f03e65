"""Shared fixtures: tiny real transformers checkpoints (random weights) saved as safetensors."""

from __future__ import annotations

import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if platform.machine().lower() in ("x86_64", "amd64"):
    # The suite-wide CPU guard, part 1 (before torch is imported; subprocesses inherit it): torch's
    # AVX2 kernels on every x86 CPU, so bitsandbytes registers none of its AVX-512 torch kernels. Its
    # native library still picks its AVX-512 decode by the CPU (wrong when rows are not whole blocks):
    # tests/test_rowdecode.py runs both of its branches on any CPU. Part 2 is below.
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"

import pytest  # noqa: E402
import torch  # noqa: E402

#: x86 CPU flags that change which code runs: ours (avx2, f16c, avx512f, avx512bw) and bitsandbytes' (avx512*).
_FLAGS = ("avx2", "f16c", "avx512f", "avx512bw", "avx512_bf16")


def cpu_line() -> str:
    """One line naming the CPU, the features that matter, and the code paths this run exercises."""
    import platform

    from nf4convert import native

    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    features = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in _FLAGS) if flags else "no x86 flags"
    try:
        from nf4convert.load import quiet_bitsandbytes

        quiet_bitsandbytes()
        from bitsandbytes.functional import has_avx512bf16

        peer = ("present" if has_avx512bf16() else "absent") + " (off in tests except those marked avx512bf16)"
    except ImportError:
        peer = "not installed"
    return (
        f"cpu: {model} ({platform.machine()}); {features}; torch capability {torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}); "
        f"nf4convert native kernel: {native.variant() if native.library() else 'unavailable'} (capped at avx2, portable and eager also tested); "
        f"bitsandbytes AVX512-BF16 path: {peer}"
    )


@pytest.fixture(scope="session", autouse=True)
def no_avx512bf16_path():
    """The suite-wide CPU guard, part 2: every ``Linear4bit`` is built with bitsandbytes'
    AVX512-BF16 CPU path off (it repacks weights on the first eval forward and computes in bfloat16),
    so no test depends on whether the CPU has AVX512-BF16. Tests marked ``avx512bf16`` get the real
    detection back (:func:`real_avx512bf16_detection`)."""
    try:
        from nf4convert.load import quiet_bitsandbytes

        quiet_bitsandbytes()
        import bitsandbytes.nn.modules as modules
    except ImportError:
        yield
        return
    real = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: False
    yield real
    modules.has_avx512bf16 = real


@pytest.fixture
def real_avx512bf16_detection(request, no_avx512bf16_path, monkeypatch):
    """For the tests about bitsandbytes' AVX512-BF16 CPU path (marked ``avx512bf16``): the real
    detection, as a user's process has it."""
    assert request.node.get_closest_marker("avx512bf16"), "only tests marked avx512bf16 may leave the CPU guard"
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", no_avx512bf16_path)
    return no_avx512bf16_path


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(cpu_line())


def _save(model: torch.nn.Module, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (bf16, untied lm_head) saved in several shards with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return _save(model, tmp_path_factory.mktemp("llama") / "src", max_shard_size="100KB")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (Conv1D layers, tied lm_head), float32, one shard."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return _save(GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2") / "src")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder, float16."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return _save(BertModel(config).to(torch.float16), tmp_path_factory.mktemp("bert") / "src")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process through its real entry point; returns (exit code, stdout, stderr) of that run."""
    from nf4convert.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # what the test printed before (building its checkpoint) is not the command's
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
