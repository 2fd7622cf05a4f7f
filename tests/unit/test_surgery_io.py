"""Streaming safetensors I/O: sharded read/write, corruption detection, atomic failure."""
import errno
import json

import pytest
import torch

from pipeline.io_utils import atomic_dir
from pipeline.checkpoint import safetensors_io as sio


def tensors(n=6, size=64):
    gen = torch.Generator().manual_seed(0)
    return {f"t.{i}": torch.randn(size, generator=gen) for i in range(n)}


def write(out, items, max_shard_bytes=sio.DEFAULT_SHARD_BYTES):
    out.mkdir(parents=True, exist_ok=True)
    writer = sio.ShardedWriter(out, max_shard_bytes)
    writer.add_all(items.items())
    return writer.close()


def test_single_file_round_trip(tmp_path):
    items = tensors()
    weight_map = write(tmp_path, items)
    assert set(weight_map.values()) == {"model.safetensors"}
    assert not (tmp_path / sio.INDEX_FILE).exists()
    reader = sio.CheckpointReader(tmp_path)
    assert reader.keys() == list(items) and reader.shapes()["t.0"] == (64,)
    assert all(torch.equal(reader.get(k), v) for k, v in items.items())


def test_sharded_round_trip_writes_an_index(tmp_path):
    items = tensors()                       # 6 tensors x 256 bytes, 2 per shard
    write(tmp_path, items, max_shard_bytes=600)
    index = json.loads((tmp_path / sio.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 6 * 256
    reader = sio.CheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(k), v) for k, v in items.items())
    assert len(reader.files()) == 4


def test_duplicate_tensor_name_is_refused(tmp_path):
    writer = sio.ShardedWriter(tmp_path)
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor a written twice"):
        writer.add("a", torch.zeros(2))


def test_missing_shard_is_named(tmp_path):
    write(tmp_path, tensors(), max_shard_bytes=600)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00003.safetensors is missing"):
        sio.CheckpointReader(tmp_path)


def test_truncated_file_is_detected(tmp_path):
    write(tmp_path, tensors())
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="model.safetensors: truncated or corrupt"):
        sio.CheckpointReader(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        sio.CheckpointReader(tmp_path)


def test_corrupt_header_is_detected(tmp_path):
    write(tmp_path, tensors())
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[9:14] = b"\xff\xfe{{{"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        sio.CheckpointReader(tmp_path)


def test_index_pointing_at_wrong_shard(tmp_path):
    write(tmp_path, tensors(), max_shard_bytes=600)
    index = json.loads((tmp_path / sio.INDEX_FILE).read_text())
    index["weight_map"]["t.0"] = "model-00003-of-00003.safetensors"
    (tmp_path / sio.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor t.0 is mapped to model-00003-of-00003"):
        sio.CheckpointReader(tmp_path)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        sio.CheckpointReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        sio.CheckpointReader(tmp_path / "nope")


def test_disk_full_mid_write_leaves_no_output(tmp_path, monkeypatch):
    real_write, calls = sio._write_shard_file, []

    def fail_on_second_shard(items, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(items, path)

    monkeypatch.setattr(sio, "_write_shard_file", fail_on_second_shard)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(out) as tmp:
            write(tmp, tensors(), max_shard_bytes=600)
    assert len(calls) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []
