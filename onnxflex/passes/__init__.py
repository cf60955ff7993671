"""The passes of a quantization run, one per module, each ``run(graph, ctx) -> graph`` (base.py).

Order (onnxflex.api.quantize): prepare -> load_calibration -> equalize -> analyze -> awq_scale -> select ->
partition -> calibrate -> reconstruct -> qdq -> validate -> check.
"""
