"""coopkit.exporters: write a fitted or zero-shot classifier as one ONNX graph."""
