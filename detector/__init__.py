"""The bundled detector: RetinaNet and its variants on torchvision's detection components.

`build_model`, `model_from_config` and `MODEL_NAMES` load `detector.model` (and torch) on first
use, so that modules of this package that need no torch stay light to import.
"""

__all__ = ["build_model", "model_from_config", "MODEL_NAMES"]


def __getattr__(name: str):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
