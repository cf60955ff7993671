"""onnxflex: FlexRound post-training quantization for ONNX graphs, written as standard QDQ ONNX."""
from .config import QuantConfig
from .errors import OnnxflexError

__all__ = ["quantize", "QuantConfig", "QuantResult", "OnnxflexError"]
__version__ = "0.1.0"


def __getattr__(name):
    # torch and onnxruntime load lazily, so `import onnxflex` and `onnxflex --help` stay quick
    if name in ("quantize", "QuantResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
