"""Weight quantization: blockwise N-bit codes for ONNX Runtime's MatMulNBits (RTN, AWQ), exact
transcoding of GGUF blocks, and ggml's block codecs (Q4_0 ... Q8_0, K-quants) for GGUF files."""
