"""Weight quantization: blockwise N-bit codes for ONNX Runtime's MatMulNBits (RTN, AWQ) and
exact transcoding of GGUF blocks."""
