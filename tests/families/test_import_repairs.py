"""The import repairs of families/compat.py: the published LLaDA2 ``modeling_llada2_moe.py`` imports
``transformers.modeling_attn_mask_utils`` and ``transformers.utils.import_utils.is_torch_fx_available``,
both gone in transformers 5. A module with exactly those imports fails to import without the repair,
imports with it (also from a standalone copy of compat.py, as self-contained checkpoints carry it), and
the served mask helpers compute transformers 4's masks (checked against masks written out here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from qdlm_export.families import compat

PUBLISHED_IMPORTS = textwrap.dedent('''
    import torch
    from transformers.modeling_attn_mask_utils import (
        _prepare_4d_causal_attention_mask,
        _prepare_4d_causal_attention_mask_for_sdpa,
    )
    from transformers.pytorch_utils import is_torch_greater_or_equal_than_1_13
    from transformers.utils.import_utils import is_torch_fx_available

    if is_torch_fx_available():
        if not is_torch_greater_or_equal_than_1_13:
            import torch.fx
        _prepare_4d_causal_attention_mask = torch.fx.wrap(_prepare_4d_causal_attention_mask)
''')


def _run(tmp_path: Path, preamble: str) -> subprocess.CompletedProcess:
    (tmp_path / "published_imports.py").write_text(PUBLISHED_IMPORTS)
    code = preamble + "\nimport published_imports\nprint('imported')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_published_imports_fail_without_the_repair_and_work_with_it(tmp_path):
    bare = _run(tmp_path, "")
    # The first import this transformers cannot serve: the mask module (5.0-5.24), or, where the module
    # is back as a deprecated shim (5.25), is_torch_fx_available.
    assert bare.returncode != 0, bare.stdout
    assert "modeling_attn_mask_utils" in bare.stderr or "is_torch_fx_available" in bare.stderr, bare.stderr
    # The standalone copy a self-contained checkpoint carries (qdlm_compat.py), without qdlm_export.
    (tmp_path / "qdlm_compat.py").write_text(Path(compat.__file__).read_text())
    repaired = _run(tmp_path, "import qdlm_compat\nassert 'qdlm_export' not in __import__('sys').modules")
    assert repaired.returncode == 0 and "imported" in repaired.stdout, repaired.stderr


def test_served_mask_helpers_compute_transformers_4_masks():
    """The stand-in's helpers (what the repair serves where transformers lacks the module) against masks
    written out here, in float64."""
    compat.reset_log()
    prepare, prepare_sdpa = compat._prepare_4d_causal_attention_mask, compat._prepare_4d_causal_attention_mask_for_sdpa
    embeds = torch.randn(2, 6, 4, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    low = torch.finfo(torch.float64).min
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    zero, floor = torch.tensor(0.0, dtype=torch.float64), torch.tensor(low, dtype=torch.float64)
    want = torch.where(causal[None, None] & keep.bool()[:, None, None, :], zero, floor)
    assert prepare_sdpa(None, (2, 6), embeds, 0) is None  # full attention
    assert prepare_sdpa(torch.ones(2, 6), (2, 6), embeds, 0) is None
    assert torch.equal(prepare_sdpa(keep, (2, 6), embeds, 0), want)
    assert torch.equal(prepare(keep, (2, 6), embeds, 0), want)
    plain_causal = torch.where(causal, zero, floor).expand(2, 1, 6, 6)
    assert torch.equal(prepare(None, (2, 6), embeds, 0), plain_causal)
    block = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)).double()
    assert prepare_sdpa(block, (2, 6), embeds, 0) is block  # 4-D: as given
    assert "attn-mask-utils-module" in compat.applied_repair_ids()


def test_the_published_code_imports_mask_helpers_that_match_the_stand_in():
    """``from transformers.modeling_attn_mask_utils import ...`` works under this transformers: the
    stand-in where the module is gone, transformers' own where it is back (5.25, deprecated). Either
    way the helpers give the stand-in's masks (float32: transformers' own cannot fill float64 masks)."""
    import transformers.modeling_attn_mask_utils as served

    embeds = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    for mask in (keep, None):
        for name in ("_prepare_4d_causal_attention_mask", "_prepare_4d_causal_attention_mask_for_sdpa"):
            ours = getattr(compat, name)(mask, (2, 6), embeds, 0)
            theirs = getattr(served, name)(mask, (2, 6), embeds, 0)
            assert (ours is None) == (theirs is None), (name, mask)
            if ours is not None:
                assert torch.equal(ours, theirs), (name, mask)
    # and a 2-token continuation after a 4-token cache
    cached = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    ours = compat._prepare_4d_causal_attention_mask(cached, (2, 2), embeds[:, :2], 4)
    assert torch.equal(ours, served._prepare_4d_causal_attention_mask(cached, (2, 2), embeds[:, :2], 4))
