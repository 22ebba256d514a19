"""Writers: ONNX folders, GGUF files and HF folders from a checkpoint's tensor stream."""
