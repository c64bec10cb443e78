"""Analysis: inspect a quantized model or ONNX file (quantizer table + placement lint)."""
