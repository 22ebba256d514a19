"""The files of an ONNX folder: what `convert` writes and the runtime, bench and cache read."""

META_FILE = "lmforge.json"  # lmforge's own metadata: marks a folder lmforge wrote
GENAI_FILE = "genai_config.json"  # onnxruntime-genai's config (lmforge also runs folders that have only this)
MODEL_FILE = "model.onnx"  # last-position logits: lmforge's engine
FULL_FILE = "model.genai.onnx"  # every position's logits: onnxruntime-genai and evaluation
LOGITS_TO_KEEP = "logits_to_keep"  # input of model.onnx: how many final positions get logits (default 1)
