"""The streaming safetensors writer, read back by the safetensors library itself."""

import json

import pytest
import torch
from safetensors import safe_open

from qdlm_export.format.writer import ShardedWriter


def random_tensors():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return {
        "a.f32": torch.randn(7, 13, generator=g),
        "a.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "a.f16": torch.randn(9, generator=g).to(torch.float16),
        "b.i32": torch.randint(-2**31, 2**31 - 1, (4, 6), dtype=torch.int32, generator=g),
        "b.u8": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g),
        "b.i64": torch.tensor([11, 4096]),
        "c.scalar": torch.tensor(3.5),
        "c.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("max_shard", [10**9, 200])
def test_round_trip_through_safetensors(tmp_path, max_shard):
    tensors = random_tensors()
    writer = ShardedWriter(tmp_path, max_shard_bytes=max_shard)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == sorted(f.name for f in files)
    got = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                got[k] = h.get_tensor(k)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(index["weight_map"]) == set(tensors)
    else:
        assert files[0].name == "model.safetensors"


def test_duplicate_name_refused(tmp_path):
    writer = ShardedWriter(tmp_path)
    writer.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("x", torch.ones(2))


@pytest.mark.parametrize("max_shard", [10**9, 200])
def test_manifest_lists_every_tensor_as_the_files_store_it(tmp_path, max_shard):
    """The manifest (what quantize records in qdlm_report.json) against the files read back by the
    safetensors library: every tensor, with the dtype name and shape its header holds."""
    tensors = random_tensors()
    writer = ShardedWriter(tmp_path, max_shard_bytes=max_shard)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
             torch.uint8: "U8", torch.int64: "I64"}
    stored = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                stored[k] = {"dtype": names[t.dtype], "shape": list(t.shape)}
    manifest = writer.manifest()
    assert manifest == stored and list(manifest) == sorted(tensors)
    json.dumps(manifest)  # goes into a JSON report as is
