"""DiT Studio: train, convert, compress and sample diffusion transformers."""
from .config import DIT_PRESETS, model_kwargs, preset_names
from .model import DiT
from . import dynamic as _dynamic  # noqa: E402,F401  registers the `dynamic` model transform

__version__ = "0.1.0"
__all__ = ["DiT", "DIT_PRESETS", "model_kwargs", "preset_names", "__version__"]
