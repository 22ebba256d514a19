"""Writers: ONNX folders (and, later, GGUF files) from a checkpoint's tensor stream."""
