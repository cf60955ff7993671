"""Round to nearest: the zero-effort baseline, and the start every other method is judged against."""
from . import Method

METHOD = Method("rtn", "onnxflex.quantizers.rtn:RTNQuantizer", fit="none", summary="round to nearest on the range-searched grid")
