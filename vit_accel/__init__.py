"""vit-accel: one Vision Transformer, trained the same way on CPU, NVIDIA GPUs and Graphcore IPUs."""
import importlib
from typing import Any, Callable, Dict

__version__ = "0.1.0"


def lazy_names(package: str, where: Dict[str, str]) -> Callable[[str], Any]:
    """A package's module ``__getattr__`` for names it loads on first use: ``where`` maps each name to
    the submodule defining it (this package and vit_accel.data: most of their names load torch,
    and `vit-accel configs`, `--help` and a recipe's errors answer without it)."""
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module("." + where[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


_WHERE = {"VARIANTS": "variants", "ViT": "model", "ViTConfig": "model", "create_vit": "model", "vit_config": "model"}
__all__ = sorted(_WHERE)
__getattr__ = lazy_names(__name__, _WHERE)
