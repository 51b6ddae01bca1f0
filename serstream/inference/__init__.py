"""The ONNX Runtime session and the inference worker."""
