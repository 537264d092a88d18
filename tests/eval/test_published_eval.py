"""Evaluation on the published forward signatures: a padded batch gives each prompt what it gets alone
(Dream: the 4-D boolean mask and position ids its code needs; LLaDA, whose forward ignores the mask:
rows generated one at a time)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from qdlm_export.eval.generation import _logits, dream_generate, llada_generate
from qdlm_export.fixtures import MASK_ID, PAD_ID
from qdlm_export.quantize.fidelity import prepare_folder_code

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(folder):
    prepare_folder_code(folder, "AutoModel")  # the in-memory repairs (families/compat.py)
    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def _prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 2000, (n,), generator=gen) for n in (9, 5, 7)]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    am = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = p
        am[j, width - len(p):] = 1
    return ids, am


def test_llada_padding_cannot_change_results(published_llada):
    model = _load(published_llada)
    prompts = _prompts()
    ids, am = _left_padded(prompts)
    # The published forward ignores the mask: a naively padded batch is wrong at the real positions.
    with torch.no_grad():
        naive = model(ids, attention_mask=am).logits[1, -len(prompts[1]):]
        alone = model(prompts[1][None]).logits[0]
    assert (naive - alone).abs().max() > 1e-3
    kw = dict(steps=8, gen_length=8, block_length=8, mask_token_id=MASK_ID, seed=0)
    batch = llada_generate(model, ids, attention_mask=am, **kw)
    for j, p in enumerate(prompts):
        single = llada_generate(model, p[None], **kw)[0]
        assert torch.equal(batch[j, ids.shape[1]:], single[len(p):]), j
        assert torch.equal(batch[j, : ids.shape[1]], ids[j])


def test_dream_gets_the_mask_it_needs_and_padding_changes_nothing(published_dream):
    model = _load(published_dream)
    prompts = _prompts()
    ids, am = _left_padded(prompts)
    with pytest.raises(RuntimeError):  # what a 2-D padding mask does to the published forward
        model(ids, attention_mask=am)
    with torch.no_grad():
        padded = _logits(model, ids, am, logits_shift=True)
        for j, p in enumerate(prompts):
            alone = _logits(model, p[None], None, logits_shift=True)[0]
            got = padded[j, ids.shape[1] - len(p):]
            assert torch.isfinite(got).all()
            assert torch.allclose(got[1:], alone[1:], atol=1e-4, rtol=1e-4), j  # position 0: the shift's copy
    kw = dict(steps=6, max_new_tokens=6, alg="maskgit_plus", mask_token_id=MASK_ID, seed=0)
    batch = dream_generate(model, ids, attention_mask=am, **kw)
    for j, p in enumerate(prompts):
        single = dream_generate(model, p[None], **kw)[0]
        assert torch.equal(batch[j, ids.shape[1]:], single[len(p):]), j


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_sampler_equals_the_published_diffusion_generate(published_dream, alg):
    """Greedy (temperature 0) sampling is deterministic: our sampler and the published
    diffusion_generate (repaired: its default generation config needs from_model_config) agree."""
    model = _load(published_dream)
    ids = torch.randint(3, 2000, (2, 5), generator=torch.Generator().manual_seed(11))
    published = model.diffusion_generate(ids, max_new_tokens=6, steps=6, alg=alg, temperature=0.0)
    ours = dream_generate(model, ids, max_new_tokens=6, steps=6, alg=alg, temperature=0.0, mask_token_id=MASK_ID, seed=0)
    assert torch.equal(published, ours)


# ---- provenance that survives a move ----------------------------------------------------------------


def test_eval_finds_a_relative_local_original_from_another_directory(published_llada, tmp_path, monkeypatch):
    import shutil

    from qdlm_export.errors import CheckpointError
    from qdlm_export.eval.checkpoint_files import original_of
    from qdlm_export.format.spec import LOCAL_SOURCE_FILE
    from qdlm_export.quantize.api import make_config, quantize

    work = tmp_path / "work"
    shutil.copytree(published_llada, work / "models" / "tiny")
    monkeypatch.chdir(work)
    quantize("models/tiny", "out/q", make_config("rtn", bits=4), trust_remote_code=True, verify=False)
    out = work / "out" / "q"
    qc = __import__("json").loads((out / "config.json").read_text())["quantization_config"]
    assert qc["provenance"]["source"] == "models/tiny" and qc["provenance"]["source_kind"] == "local"
    assert str(work) not in (out / "config.json").read_text()  # no absolute local path in what is published
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert original_of(out) == str((work / "models" / "tiny").resolve())
    # `push` leaves the record out (".local" is not on its upload allow-list).
    from qdlm_export.hub.push import upload_plan, validate_checkpoint

    files, skipped = upload_plan(validate_checkpoint(out))
    assert LOCAL_SOURCE_FILE in skipped and LOCAL_SOURCE_FILE not in dict(files)
    # Without the record (a copy elsewhere), "models/tiny" is still a local path, not a Hub id.
    (out / LOCAL_SOURCE_FILE).unlink()
    with pytest.raises(CheckpointError, match="local model folder models/tiny") as info:
        original_of(out)
    assert "--original" in info.value.hint


# ---- the original, as published, loaded for evaluation -----------------------------------------------


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_eval_loads_the_published_original_with_its_repairs(family, published_llada, published_dream, tmp_path):
    """`qdlm-export eval` loads the original (not self-contained) with the same in-memory repairs as
    `quantize`: under plain transformers 5 its from_pretrained fails (test_published_models.py)."""
    import shutil

    from qdlm_export.eval.loading import load_model

    folder = tmp_path / f"orig-{family}"  # a new folder name: transformers gives it its own, unpatched module
    shutil.copytree(published_llada if family == "llada" else published_dream, folder)
    model = load_model(folder, dtype="float32", trust_remote_code=True)
    ids = torch.randint(3, 2000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (2, 16, model.config.vocab_size)
    if family == "dream":  # the rotary buffers were recomputed, not left as from_pretrained made them
        from qdlm_export.families import compat

        assert torch.allclose(model.model.rotary_emb.inv_freq, compat._default_inv_freq(model.config))


def test_eval_reports_broken_original_code_as_the_models(published_dream, tmp_path):
    import shutil

    import transformers

    from qdlm_export.errors import UnsupportedModelError
    from qdlm_export.eval.loading import load_model

    folder = tmp_path / "orig-broken"
    shutil.copytree(published_dream, folder)
    path = folder / "modeling_dream.py"
    path.write_text(path.read_text().replace("ACT2FN[config.hidden_act]", "ACT2FN[config.hidden_activation]"))
    with pytest.raises(UnsupportedModelError) as info:
        load_model(folder, dtype="float32", trust_remote_code=True)
    message = str(info.value) + " " + (info.value.hint or "")
    assert "modeling_dream.py" in message and "hidden_activation" in message
    assert f"transformers {transformers.__version__}" in message and "--original" in message
    assert "bug" not in message.lower()
