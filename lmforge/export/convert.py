"""`lmforge convert`: checkpoint -> ONNX folder, written atomically.

Everything goes into a hidden temporary folder beside OUT that is renamed into place only when
complete, so an interrupted conversion never leaves a folder that looks finished; the next run
removes the leftovers of dead conversions and starts again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import onnx

from lmforge.arch import get_arch
from lmforge.checkpoint import open_checkpoint
from lmforge.export.atomic import atomic_folder, check_output
from lmforge.export.folder import FULL_FILE, GENAI_FILE, META_FILE, MODEL_FILE
from lmforge.export.onnx import GraphOptions, build
from lmforge.export.targets import get_target, with_overrides
from lmforge.export.weights import WeightSource
from lmforge.progress import Progress, shown

FORMAT_VERSION = 3  # 2: two graphs per folder (model.onnx, model.genai.onnx); 3: model.onnx takes logits_to_keep
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def write_tokenizer(ckpt, folder: Path) -> None:
    """The model's tokenizer files (copied from an HF folder, rebuilt from GGUF metadata)."""
    if ckpt.format == "hf":
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).exists():
                shutil.copy(ckpt.path / name, folder / name)
        return
    tok = ckpt.tokenizer()
    tok.save(folder)
    template = ckpt.chat_template()
    if template:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def pad_id(spec, tok, eos_ids) -> int:
    """The source's padding id (config.json or GGUF metadata, then the tokenizer's pad token),
    EOS only when it names none or one outside the vocabulary."""
    for pad in (spec.pad_token_id, tok.pad_id):
        if pad is not None and 0 <= pad < spec.vocab_size:
            return int(pad)
    return eos_ids[0]


def genai_config(spec, target, eos_ids, bos_id, context: int | None = None, pad: int | None = None) -> dict:
    """onnxruntime-genai's genai_config.json for a folder with full logits (`pad`: padding id,
    EOS when None)."""
    context = context or spec.context_length
    provider_options = {"cpu": [], "cuda": [{"cuda": {}}], "dml": [{"dml": {}}]}[target.provider]
    return {
        "model": {
            "bos_token_id": bos_id if bos_id is not None else eos_ids[0],
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": FULL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                    **({"position_ids": "position_ids"} if target.separate_rotary else {}),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": list(eos_ids),
            "pad_token_id": pad if pad is not None else eos_ids[0],
            # onnxruntime-genai names decoder types after HF's model_type (its "gemma3" is the
            # vision-language package, "gemma3_text" the text model)
            "type": get_arch(spec.arch).genai_type or get_arch(spec.arch).model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    target: str = "cpu-fp32",
    force: bool = False,
    quant: str | None = None,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    requantize: bool | None = None,
    max_positions: int | None = None,
    calibration: str | None = None,
    separate_rotary: bool | None = None,
    progress: bool | None = None,
    head_bits: int | None = None,
) -> Path:
    """Convert SOURCE (known name, HF folder, GGUF file) into an ONNX folder OUT for TARGET.

    Args: source; output folder; target preset name; replace an existing OUT; quantization
    overrides of the preset (rtn|awq, block size, symmetric, accuracy level, requantize GGUF
    blocks instead of transcoding them); rotary table length (default: the model's context);
    AWQ calibration text file (default: Python's documentation); DirectML's graph form (q/k/v
    apart, RotaryEmbedding nodes) on any target; progress bar (default: when stderr is a terminal);
    bits of the quantized output head / tied embedding (8 by default, 4 as onnxruntime-genai's
    builder does). Returns the output folder, which holds model.onnx (last-position
    logits), model.genai.onnx (every position, for onnxruntime-genai and evaluation) over one
    weights file, the tokenizer, genai_config.json and lmforge.json.
    """
    t = with_overrides(get_target(target), quant, block_size, symmetric, accuracy_level, requantize, head_bits)
    if separate_rotary is not None:
        t = dataclasses.replace(t, separate_rotary=separate_rotary)
    ckpt = open_checkpoint(source)
    out = check_output(Path(out), force, META_FILE, ckpt.path)
    tok = ckpt.tokenizer()  # fail before the long part when the tokenizer is missing
    started = time.time()
    with atomic_folder(out) as tmp:
        options = GraphOptions(
            dtype=t.dtype, quant=t.quant, max_positions=max_positions, separate_rotary=t.separate_rotary
        )
        show = shown(progress)
        awq = None
        if t.quant is not None and t.quant.method == "awq":
            from lmforge.export.awq import compute_awq_scales

            awq = compute_awq_scales(ckpt, t.quant, calibration=calibration, progress=show)
        src = WeightSource(ckpt, t.quant, awq)
        with Progress(None, show, "convert", unit="layer") as bar:
            graphs = build(ckpt, tmp, options, src, progress=bar.goto if show else None)
        if t.quant is not None:
            src.report()
        onnx.save_model(graphs["last"], tmp / MODEL_FILE)
        onnx.save_model(graphs["full"], tmp / FULL_FILE)
        if t.ort_format:
            _write_ort_format(tmp)
        write_tokenizer(ckpt, tmp)
        eos = list(dict.fromkeys([*ckpt.spec.eos_token_ids, *tok.eos_ids])) or [0]
        meta = _folder_meta(ckpt, t, src, tok, eos, tmp, max_positions, time.time() - started)
        genai = genai_config(ckpt.spec, t, eos, tok.bos_id, max_positions, pad_id(ckpt.spec, tok, eos))
        (tmp / GENAI_FILE).write_text(json.dumps(genai, indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _write_ort_format(folder: Path) -> None:
    """model.ort: the graph in ONNX Runtime's flatbuffer format, for ONNX Runtime Mobile."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    convert_onnx_models_to_ort(
        folder / MODEL_FILE,
        output_dir=folder,
        optimization_styles=[OptimizationStyle.Fixed],
        enable_type_reduction=False,
    )


def _folder_meta(
    ckpt, t, src: WeightSource, tok, eos: list[int], tmp: Path, max_positions: int | None, seconds: float
) -> dict:
    """lmforge.json: what the folder holds and how it was made (the engine reads it back)."""
    files = sorted(p.name for p in tmp.iterdir() if p.name.endswith((".onnx", ".data", ".ort")))
    return {
        "format": "lmforge-onnx",
        "version": FORMAT_VERSION,
        "target": t.name,
        "dtype": t.dtype,
        "provider": t.provider,
        "quant": dataclasses.asdict(t.quant) if t.quant else None,
        "transcoded": sorted(src.transcoded),
        "requantized": sorted(src.requantized),
        "model_file": MODEL_FILE,
        "full_file": FULL_FILE,
        "arch": ckpt.spec.arch,
        "n_layers": ckpt.spec.n_layers,
        "n_kv_heads": ckpt.spec.n_kv_heads,
        "head_dim": ckpt.spec.head_dim,
        "vocab_size": ckpt.spec.vocab_size,
        "context_length": ckpt.spec.context_length,
        "max_positions": max_positions or ckpt.spec.context_length,
        "eos_token_ids": eos,
        "bos_token_id": tok.bos_id,
        "add_bos": tok.add_bos,
        "files": {name: (tmp / name).stat().st_size for name in files},
        "source": str(ckpt.path),
        "seconds": round(seconds, 2),
    }
