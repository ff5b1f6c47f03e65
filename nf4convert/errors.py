"""The exceptions nf4convert raises on bad input.

Every class derives from :class:`NF4ConvertError` and, where one fits, from the
builtin a caller would naturally catch. The CLI turns any of them into a single
line on stderr and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NF4ConvertError(Exception):
    """Base class of every error nf4convert raises for bad input or a bad environment."""

    #: Whether a conversion that fails with it keeps its finished shards (a fault of the network or
    #: the cluster, not of the input: the same command later resumes).
    resumable = False

    exit_code = 1


class SourceError(NF4ConvertError, ValueError):
    """The source checkpoint is missing, empty, malformed or unsafe to read."""

    exit_code = 2


class DeviceError(NF4ConvertError, ValueError):
    """The device asked for does not exist here (checked before any work; exit 2, as a bad argument)."""

    exit_code = 2


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The source path does not exist or holds no safetensors weights."""


class FormatError(NF4ConvertError, ValueError):
    """A file does not follow the safetensors container or the nf4convert format (spec/FORMAT.md)."""

    exit_code = 3


class UnsupportedVersionError(FormatError):
    """The output was written by a format version this reader does not know."""


class QuantizationError(NF4ConvertError, ValueError):
    """A tensor cannot be quantized (non-finite values, bad block size, ...)."""

    exit_code = 4


class OptionError(QuantizationError):
    """An option value (or combination) no conversion takes, refused before any work: exit 2, as
    click's own refusals of a bad option."""

    exit_code = 2


class OutputError(NF4ConvertError, OSError):
    """The output location cannot be used (exists, lies inside the source, not writable)."""

    exit_code = 5


class MissingDependencyError(NF4ConvertError, ImportError):
    """An optional dependency (bitsandbytes, transformers) is needed and not installed."""

    exit_code = 6


class LoadError(NF4ConvertError, RuntimeError):
    """NF4 weights do not fit the module or architecture they are loaded into."""

    exit_code = 7


class VerificationFailed(NF4ConvertError):
    """``verify`` found problems (listed in its report)."""

    exit_code = 8


class HubError(NF4ConvertError, OSError):
    """The Hugging Face Hub (or its local cache) cannot give or take what was asked."""

    exit_code = 9
    #: Raised during a conversion, it keeps the finished shards: running again resumes after them.
    resumable = True


class ClusterError(NF4ConvertError, RuntimeError):
    """The Dask cluster cannot be started or reached, or a shard task kept failing on it."""

    exit_code = 10
    resumable = True
