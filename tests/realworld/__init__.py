"""Real-world ONNX corpus (issue 10): manifest, fetching, input recipes, harness, tests."""
