"""Weight-activation methods, step 1 (the transforms), with quantization off: on the tiny outlier models
the transformed model computes what the float model does, and each method's transform is the one its
paper defines (SmoothQuant's scales, QuaRot's rotations and online Hadamards, DuQuant's shared block
rotations and permutation).

Every model here is transformed by the pipeline's own steps (``wa_helpers.in_memory`` with
``quantize=False``: ``prepare`` and per block ``transform_block``, calibration propagated through each
transformed block); the references are the untouched float model and float64 math.
"""

from __future__ import annotations

import functools

import pytest
import torch

from qdlm_export.methods.weight_activation import TransformedLinear
from qdlm_export.quantize.api import make_config
from qdlm_export.core.transforms import apply_input_transforms
from tests import wa_helpers as H

FAMILIES = ("llada", "dream")
EQUIVALENCE_TOL = 1e-4  # float32 models; float64 transforms folded into float32 weights
DUQUANT = (("max_rotation_steps", 64),)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def transformed(family: str, method: str, options: tuple = (), intermediate_size: int = 768):
    """The outlier model after the method's transforms only (cached; tests only run it)."""
    return _transformed(family, method, tuple(options), intermediate_size)


@functools.lru_cache(maxsize=None)
def _transformed(family, method, options, intermediate_size):
    folder = H.outlier_model(family, intermediate_size=intermediate_size)
    return H.in_memory(folder, make_config(method, **dict(options)), quantize=False)


def float_logits(family: str, intermediate_size: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out masked inputs and the float model's logits on them."""
    return _float_logits(family, intermediate_size)


@functools.lru_cache(maxsize=None)
def _float_logits(family, intermediate_size):
    folder = H.outlier_model(family, intermediate_size=intermediate_size)
    ids = H.tokens(folder, H.EVAL)
    return ids, H.logits(H.load(folder), ids)


@functools.lru_cache(maxsize=None)
def adapter_of(family: str):
    return H.make_method(H.outlier_model(family), make_config("rtn-wa")).adapter


def linears(model, family: str) -> dict[str, TransformedLinear]:
    """Full name -> the model's transformed linear, for every linear the family adapter lists."""
    adapter = adapter_of(family)
    names = adapter.quantizable_linears(len(adapter.block_list(model)))
    modules = {name: model.get_submodule(name) for name in names}
    assert all(isinstance(m, TransformedLinear) for m in modules.values())
    return modules


@torch.no_grad()
def transformed_inputs(model, modules: dict[str, TransformedLinear], ids: torch.Tensor, batch: int = 4):
    """What each module's matmul sees (its input after the online ops), over ``ids`` in batches."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def record(name):
        def hook(module, args):
            x = module.transformed_input(args[0])
            seen[name].append(x.detach().reshape(-1, x.shape[-1]).clone())

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]
    try:
        for start in range(0, ids.shape[0], batch):
            model(input_ids=ids[start : start + batch])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@torch.no_grad()
def original_inputs(family: str, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = H.load(H.outlier_model(family))
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).clone())) for n in names]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def peak_to_rms(x: torch.Tensor) -> float:
    """Mean over tokens of max|x| / rms(x): ~3 for Gaussian-like rows, large with outlier channels."""
    x = x.double()
    return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()


def ops_by_role(model, family: str) -> dict[str, list]:
    """Role-relative name (e.g. ``attn_out``) -> the ops list, asserting every block agrees."""
    adapter = adapter_of(family)
    result: dict[str, list] = {}
    for name, module in linears(model, family).items():
        local = name.split(".", len(adapter.blocks.split(".")) + 1)[-1]
        ops = [dict(op) for op in module.ops]
        assert result.setdefault(local, ops) == ops, f"{name}: ops differ between blocks"
    return result


# ---- the transformed models compute the original function ----------------------------------------------

CASES = [
    pytest.param("llada", "smoothquant", (), 768, id="llada-smoothquant"),
    pytest.param("dream", "smoothquant", (), 768, id="dream-smoothquant"),
    # LLaDA's down projection: H(768) = H_12 (x) S_64 (Paley I); Dream's: H(592) = H_148 (x) S_4 (Paley II).
    pytest.param("llada", "quarot", (), 768, id="llada-quarot-768"),
    pytest.param("dream", "quarot", (), 592, id="dream-quarot-592"),
    # 64 greedy steps instead of the default 256 keeps this file fast; the defaults run in test_wa_quality.
    pytest.param("llada", "duquant", DUQUANT, 768, id="llada-duquant"),
    pytest.param("dream", "duquant", DUQUANT, 768, id="dream-duquant"),
    pytest.param("llada", "duquant", (("per_block_rotation", True), ("max_rotation_steps", 8)), 768,
                 id="llada-duquant-per-block"),
    pytest.param("dream", "duquant", (("fold_smoothing", False), ("max_rotation_steps", 8)), 768,
                 id="dream-duquant-online-smoothing"),
]


@pytest.mark.parametrize("family,method,options,inter", CASES)
def test_transformed_model_computes_the_original_outputs(family, method, options, inter):
    ids, ref = float_logits(family, inter)
    model = transformed(family, method, options, inter)
    got = H.logits(model, ids)
    err = H.rel(got, ref)
    assert err <= EQUIVALENCE_TOL, f"{family} {method}{dict(options)}: relative error {err:.2e}"
    # ...and the transform is not the identity: some linear's stored weight W T^-T differs from W.
    source = H.load(H.outlier_model(family, intermediate_size=inter))
    changed = [n for n, m in linears(model, family).items()
               if not torch.allclose(m.weight, source.get_submodule(n).weight, rtol=1e-3, atol=1e-6)]
    assert changed, "the method left every weight unchanged"


# ---- SmoothQuant --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,alpha", [("llada", 0.5), ("dream", 0.5), ("llada", 0.8)])
def test_smoothquant_scales_and_where_they_are_folded(family, alpha):
    """Per group of linears sharing an input, ``s = max|X|^a / max|W|^(1-a)`` (max|X| measured here on
    the float model's calibration inputs, max|W| over the group's source weights), a = 0.5 by default.
    The group's weights hold ``W diag(s)``; ``1/s`` is folded into the norm gain (norm -> q/k/v,
    norm -> gate/up) or the previous linear's rows (v -> o under MHA, up -> down), except Dream's
    v -> o_proj (GQA: 2 value heads serve 4 query heads), where o_proj divides by ``s`` online."""
    if alpha == 0.5:
        assert make_config("smoothquant").alpha == 0.5  # the paper's default
    model = transformed(family, "smoothquant", () if alpha == 0.5 else (("alpha", alpha),))
    folder = H.outlier_model(family)
    source = H.load(folder)
    adapter = adapter_of(family)
    modules = linears(model, family)
    firsts = [f"{adapter.block_prefix(i)}.{g.linears[0]}" for i in range(2) for g in adapter.groups]
    seen = original_inputs(family, firsts, H.tokens(folder, H.CALIB))
    src = {name: source.get_submodule(name).weight.detach().double() for name in modules}
    online = {f"{adapter.block_prefix(i)}.self_attn.o_proj" for i in range(2)} if family == "dream" else set()
    for index in range(2):
        prefix = adapter.block_prefix(index)
        scales, row_scale = {}, {}
        for group in adapter.groups:
            names = [f"{prefix}.{n}" for n in group.linears]
            a = seen[names[0]].abs().amax(0).double()
            w = torch.stack([src[n].abs().amax(0) for n in names]).amax(0)
            scales[group] = a.pow(alpha) / w.pow(1 - alpha)
            if group.prev_linear and names[0] not in online:
                row_scale[f"{prefix}.{group.prev_linear}"] = scales[group]
        for group in adapter.groups:
            s = scales[group]
            for name in (f"{prefix}.{n}" for n in group.linears):
                module = modules[name]
                rows = row_scale.get(name, torch.ones(module.out_features, dtype=torch.float64))
                expected = src[name] * s[None, :] / rows[:, None]
                assert torch.allclose(module.weight.double(), expected, rtol=1e-4, atol=1e-7), name
                if name in online:
                    assert module.ops == [{"op": "smooth"}]
                    assert torch.allclose(module.tensors["input_smooth"].double(), s, rtol=1e-4)
                else:
                    assert module.ops == [] and not module.tensors, name
            if group.norm is not None:
                norm = f"{prefix}.{group.norm}.weight"
                assert torch.allclose(model.get_parameter(norm).double(),
                                      source.get_parameter(norm).double() / s, rtol=1e-4), norm


# ---- QuaRot -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,inter", [("llada", 768), ("dream", 592)])
def test_quarot_online_hadamards_and_folded_norms(family, inter):
    model = transformed(family, "quarot", (), inter)
    heads, head_dim = 4, 64  # the fixtures: hidden 256, 4 heads
    ops = ops_by_role(model, family)
    attn_out, down = adapter_of(family).groups[1].linears[0], adapter_of(family).groups[3].linears[0]
    assert ops.pop(attn_out) == [{"op": "hadamard", "size": heads, "stride": head_dim}]
    assert ops.pop(down) == [{"op": "hadamard", "size": inter, "stride": 1}]
    assert all(v == [] for v in ops.values()), ops  # q/k/v, gate/up: rotation folded into the weights
    # Every RMSNorm gain was folded into its readers.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            assert torch.equal(param, torch.ones_like(param)), name


@pytest.mark.parametrize("family,method", [("llada", "quarot"), ("dream", "quarot"), ("llada", "duquant"),
                                           ("dream", "duquant")])
def test_rotations_spread_the_outlier_channels(family, method):
    """The point of the rotations: the readers' inputs lose their few huge channels. Measured as the
    per-token max/rms of the q/k/v and gate/up inputs, against the float model's inputs."""
    model = transformed(family, method, DUQUANT if method == "duquant" else ())
    ids, _ = float_logits(family)
    adapter = adapter_of(family)
    names = [f"{adapter.block_prefix(i)}.{g.linears[0]}" for i in range(2) for g in adapter.groups if g.norm]
    before = original_inputs(family, names, ids)
    after = transformed_inputs(model, {n: model.get_submodule(n) for n in names}, ids)
    for name in names:
        b, a = peak_to_rms(before[name]), peak_to_rms(after[name])
        assert a < b / 3, f"{name}: max/rms {b:.1f} -> {a:.1f}"


# ---- DuQuant ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_duquant_ops_tensors_and_sharing(family):
    model = transformed(family, "duquant", DUQUANT)
    adapter = adapter_of(family)
    modules = linears(model, family)
    rotation = {"op": "block_rotation", "block_size": 128, "blocks": 1}
    expected = [dict(rotation, tensor="input_rotation_1"), {"op": "permute", "tensor": "input_permutation"},
                dict(rotation, tensor="input_rotation_2")]
    for local, ops in ops_by_role(model, family).items():
        online_smooth = family == "dream" and local == "self_attn.o_proj"  # GQA: v -> o cannot be folded
        assert ops == ([{"op": "smooth"}] if online_smooth else []) + expected, local
    for name, module in modules.items():
        for key in ("input_rotation_1", "input_rotation_2"):
            R = module.tensors[key]
            assert R.dtype == torch.float32 and R.shape == (1, 128, 128)
            assert torch.allclose(R[0].double() @ R[0].double().T, torch.eye(128, dtype=torch.float64), atol=1e-5)
        perm = module.tensors["input_permutation"]
        assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(module.in_features))
    for index in range(2):
        prefix = adapter.block_prefix(index)
        groups = {g.role: [modules[f"{prefix}.{n}"] for n in g.linears] for g in adapter.groups}
        for role in ("qkv", "gate_up"):  # k, v use q's transform; up uses gate's
            first, *rest = groups[role]
            for other in rest:
                assert other.tensors.keys() == first.tensors.keys()
                for key, value in first.tensors.items():
                    assert torch.equal(other.tensors[key], value), (role, key)
        # The search did rotate the inputs that carry the residual stream's outlier channels.
        for role in ("qkv", "gate_up"):
            R1 = groups[role][0].tensors["input_rotation_1"][0]
            assert not torch.allclose(R1, torch.eye(128), atol=1e-3), (prefix, role)


@pytest.mark.parametrize("family", FAMILIES)
def test_duquant_rotations_shrink_the_range_they_were_searched_on(family):
    """The greedy search keeps the rotation prefix with the smallest range (max - min) of the block
    values of its calibration tokens: the stored rotation 1 must shrink the range of the smoothed
    q/k/v input of block 0 (smoothing is folded into the norm, so that is q_proj's raw input), and
    the permutation and rotation 2 must not widen it again."""
    model = transformed(family, "duquant", DUQUANT)
    adapter = adapter_of(family)
    module = model.get_submodule(f"{adapter.block_prefix(0)}.{adapter.groups[0].linears[0]}")
    raw = []
    hook = module.register_forward_pre_hook(lambda m, args: raw.append(args[0].reshape(-1, args[0].shape[-1])))
    calib = H.tokens(H.outlier_model(family), H.CALIB)
    with torch.no_grad():
        for start in range(0, calib.shape[0], 4):
            model(input_ids=calib[start : start + 4])
    hook.remove()
    smoothed = torch.cat(raw).double()
    after_r1 = apply_input_transforms(smoothed, module.ops[:1], module.tensors)
    after_all = apply_input_transforms(smoothed, module.ops, module.tensors)

    def spread(t):
        return (t.max() - t.min()).item()

    assert spread(after_r1) < 0.9 * spread(smoothed), (spread(smoothed), spread(after_r1))
    assert spread(after_all) <= spread(after_r1) * (1 + 1e-3), (spread(after_r1), spread(after_all))
