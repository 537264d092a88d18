"""Shared helpers of the weight-activation tests: tiny outlier models, the pipeline's steps run on a
whole in-memory model (so the quantized model can be compared with what ``from_pretrained`` loads),
and the error measures."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import qdlm_export  # noqa: F401  (registers the quantizer)
from tests.isolation import rel  # noqa: F401  (the tests' one relative error; H.rel)
from qdlm_export.quantize.calibration import calibration_tokens
from qdlm_export.core.configs import CalibrationConfig
from qdlm_export.fixtures import build_tiny_model
from qdlm_export.methods import build_method
from qdlm_export.quantize.pipeline import build_quantized_linear, capture_block_inputs, quantize_block
from qdlm_export.quantize.source import SourceModel

CALIB = CalibrationConfig(nsamples=8, seqlen=64, seed=0)
EVAL = CalibrationConfig(nsamples=4, seqlen=64, seed=7, masking="random")
_ROOT = Path(tempfile.mkdtemp(prefix="qdlm-wa-tests-"))


@functools.lru_cache(maxsize=None)
def outlier_model(family: str, intermediate_size: int = 768, seed: int = 3) -> Path:
    """A tiny model whose residual stream has 4 channels x50 (embeddings and every norm gain)."""
    out = _ROOT / f"{family}-{intermediate_size}-{seed}"
    if not (out / "config.json").is_file():
        build_tiny_model(family, out, seed=seed, intermediate_size=intermediate_size, outlier_channels=4,
                         outlier_scale=50.0)
    return out


def tokens(folder: Path, config: CalibrationConfig) -> torch.Tensor:
    return _tokens(folder, config.nsamples, config.seqlen, config.seed, config.masking)


@functools.lru_cache(maxsize=None)
def _tokens(folder: Path, nsamples: int, seqlen: int, seed: int, masking: str) -> torch.Tensor:
    config = CalibrationConfig(nsamples=nsamples, seqlen=seqlen, seed=seed, masking=masking)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    source = SourceModel.open(str(folder), trust_remote_code=True)
    try:
        mask = source.adapter.mask_token_id(source.config_dict)
    finally:
        source.close()
    return calibration_tokens(tok, config, mask)


def load(folder: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def make_method(folder: Path, config):
    """The method as quantize() builds it for a float32 source (float32 scales)."""
    source = SourceModel.open(str(folder), trust_remote_code=True)
    try:
        return build_method(config, source.adapter, source.config_dict, scale_dtype=torch.float32,
                            quantized_linear=build_quantized_linear)
    finally:
        source.close()


@torch.no_grad()
def in_memory(folder: Path, config, *, quantize: bool = True, calibration: CalibrationConfig = CALIB):
    """The pipeline's steps on a whole model: ``prepare``, capture, and per block the pipeline's
    ``quantize_block`` (or only the method's ``transform_block`` with ``quantize=False``),
    propagating through each processed block."""
    model = load(folder)
    method = make_method(folder, config)
    blocks = method.adapter.block_list(model)
    method.prepare(model)
    calib = capture_block_inputs(model, blocks, tokens(folder, calibration), 4, torch.device("cpu"))
    for index, block in enumerate(blocks):
        prefix = method.adapter.block_prefix(index)
        if quantize:
            quantize_block(method, block, prefix, calib, propagate=True)
        else:
            method.transform_block(block, prefix, calib)
            calib.hidden = calib.run(block)
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


