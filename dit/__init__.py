"""DiT Studio: train, convert, compress and sample diffusion transformers."""
import contextlib as _contextlib
import logging as _logging


@_contextlib.contextmanager
def _quiet_optional_imports():
    """diffusers imports peft and torchao when they are installed; on a CPU-only machine torchao logs a
    warning for every CUDA extension it cannot load. Those lines say nothing about the user's job."""
    names = ("torchao", "torch.utils._pytree", "diffusers.quantizers")
    loggers = [_logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(_logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


with _quiet_optional_imports():
    import diffusers.models.modeling_utils  # noqa: F401  (pulls in peft/torchao when installed)

from .config import DIT_PRESETS, model_kwargs, preset_names  # noqa: E402
from .model import DiT  # noqa: E402
from . import dynamic as _dynamic  # noqa: E402,F401  registers the `dynamic` model transform

__version__ = "0.1.0"
__all__ = ["DiT", "DIT_PRESETS", "model_kwargs", "preset_names", "__version__"]
