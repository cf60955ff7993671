"""The parts of region-by-region reconstruction, by job; the loop itself is passes/reconstruct.py.

streams: what is live for both streams, ONNX Runtime targets, torch outputs.
losses: the one masked squared error every loss and judgement uses.
fit: the training loop (direct passes for blocks, Gram form for one-op regions) and QDrop mixing.
ranges: each activation's range chosen among calibrate's candidates by the region error it causes.
"""
