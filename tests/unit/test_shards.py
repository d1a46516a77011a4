"""Shard format: deterministic atomic writes, manifest, lazy fork-safe reader, verify."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import xxhash

from brainage_hpc.cli import main
from brainage_hpc.data.shard_checks import verify_shards
from brainage_hpc.data.shards import (
    MANIFEST_NAME,
    ShardMismatchError,
    ShardReader,
    load_manifest,
    sha256_file,
    shard_name,
)
from brainage_hpc.ingest.shard_writer import read_partial, write_failures, write_json, write_partial, write_shard

SHAPE = (6, 7, 5)


def _subjects(start: int, n: int) -> list[dict]:
    return [
        {"id": str(100000 + start + i), "age": None if i == 1 else 22.0 + i, "age_bin": i % 4, "sex": i % 2}
        for i in range(n)
    ]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, *SHAPE)).astype(np.float16)


def _write(root: Path, compression: str = "none", sizes=(3, 2)) -> Path:
    """Two shards + a manifest by hand, like `brainage preprocess` writes them."""
    root.mkdir(parents=True, exist_ok=True)
    shards, subjects, start = [], {}, 0
    for k, n in enumerate(sizes):
        subs = _subjects(start, n)
        sha = write_shard(
            root / shard_name(k),
            _images(n, k),
            subs,
            voxel_mm=4.0,
            affine=np.eye(4),
            preprocess={"shape": list(SHAPE)},
            preprocess_hash="abc",
            compression=compression,
        )
        shards.append({"file": shard_name(k), "sha256": sha, "n": n})
        for i, s in enumerate(subs):
            subjects[s["id"]] = {
                "shard": k,
                "index": i,
                "age": s["age"],
                "age_bin": s["age_bin"],
                "sex": s["sex"],
                "family_id": None,
            }
        start += n
    ids = sorted(subjects)
    write_json(
        root / MANIFEST_NAME,
        {
            "format_version": 1,
            "shape": list(SHAPE),
            "voxel_mm": 4.0,
            "affine": np.eye(4).tolist(),
            "preprocess": {"shape": list(SHAPE)},
            "preprocess_hash": "abc",
            "shards": shards,
            "subjects": subjects,
            "splits": {"train": ids[:3], "val": ids[3:]},
            "n_failures": 0,
        },
    )
    return root


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_write_is_deterministic_and_readable(tmp_path: Path, compression: str):
    a, b = _write(tmp_path / "a", compression), _write(tmp_path / "b", compression)
    for k in range(2):
        assert (a / shard_name(k)).read_bytes() == (b / shard_name(k)).read_bytes()
    assert not list(a.glob("*.tmp"))
    with h5py.File(a / shard_name(0)) as f:
        assert f["image"].shape == (3, 1, *SHAPE) and f["image"].dtype == np.float16
        assert f["image"].chunks == (1, 1, *SHAPE)
        assert [s.decode() for s in f["subject_id"][()]] == ["100000", "100001", "100002"]
        assert np.isnan(f["age"][1]) and f["age"][0] == 22.0 and f["age"].dtype == np.float32
        assert f["age_bin"].dtype == np.int8 and f["sex"].dtype == np.int8
        assert f.attrs["format_version"] == 1 and tuple(f.attrs["shape"]) == SHAPE
        assert f.attrs["preprocess_hash"] == "abc" and json.loads(f.attrs["preprocess"]) == {"shape": list(SHAPE)}
        np.testing.assert_array_equal(f["image"][()], _images(3, 0))
        # each volume's XXH3-64 as written, checked against the xxhash library directly
        assert f["image_xxh3"].dtype == np.uint64 and f["image_xxh3"].shape == (3,)
        assert [int(v) for v in f["image_xxh3"][()]] == [xxhash.xxh3_64_intdigest(v.tobytes()) for v in _images(3, 0)]


def test_write_rejects_bad_input(tmp_path: Path):
    with pytest.raises(ValueError, match="compression"):
        write_shard(
            tmp_path / "s.h5",
            _images(1, 0),
            _subjects(0, 1),
            voxel_mm=1,
            affine=np.eye(4),
            preprocess={},
            preprocess_hash="x",
            compression="zstd",
        )
    with pytest.raises(ValueError, match=r"\(N=2, 1, D, H, W\)"):
        write_shard(
            tmp_path / "s.h5",
            _images(1, 0),
            _subjects(0, 2),
            voxel_mm=1,
            affine=np.eye(4),
            preprocess={},
            preprocess_hash="x",
        )


def test_empty_shard(tmp_path: Path):
    write_shard(
        tmp_path / "e.h5",
        np.zeros((0, 1, *SHAPE), np.float16),
        [],
        voxel_mm=1,
        affine=np.eye(4),
        preprocess={},
        preprocess_hash="x",
        compression="lzf",
    )
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["image"].shape == (0, 1, *SHAPE) and len(f["subject_id"]) == 0


def test_manifest_and_reader(tmp_path: Path):
    root = _write(tmp_path / "s")
    m = load_manifest(root)
    assert load_manifest(root / MANIFEST_NAME).subjects == m.subjects
    assert m.root == root and m.shape == SHAPE and m.voxel_mm == 4.0 and len(m.shards) == 2
    assert m.subjects["100001"]["age"] is None and m.subjects["100003"]["shard"] == 1
    assert m.split_ids("val") == ["100003", "100004"]
    with pytest.raises(KeyError, match="no split 'test'. Available: train, val"):
        m.split_ids("test")
    reader = ShardReader(root)
    assert reader._files == {} and len(reader) == 5  # nothing opened in __init__
    vol = reader.read("100004")
    assert vol.shape == (1, *SHAPE) and vol.dtype == np.float16
    np.testing.assert_array_equal(vol, _images(2, 1)[1])
    np.testing.assert_array_equal(reader.read_index(0, 2), _images(3, 0)[2])
    with pytest.raises(KeyError, match="not in the manifest"):
        reader.read("999")
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.read("100000"), reader.read("100000"))
    reader.close()


def _child_read(reader: ShardReader) -> float:
    return float(reader.read("100003").astype(np.float32).sum())


def test_reader_is_safe_after_fork(tmp_path: Path):
    reader = ShardReader(_write(tmp_path / "s"))
    expected = float(reader.read("100003").astype(np.float32).sum())  # parent has open handles now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(_child_read, [reader] * 4) == [expected] * 4
    assert float(reader.read("100003").astype(np.float32).sum()) == expected


def test_reader_refuses_other_preprocessing(tmp_path: Path):
    root = _write(tmp_path / "s")
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["preprocess_hash"] = "other"
    write_json(root / MANIFEST_NAME, data)
    with pytest.raises(ShardMismatchError, match="preprocess_hash 'abc' differs"):
        ShardReader(root).read("100000")


def test_manifest_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="brainage preprocess"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable manifest"):
        load_manifest(tmp_path)


def test_verify_ok_then_names_the_flipped_shard(tmp_path: Path, capsys):
    root = _write(tmp_path / "s")
    assert verify_shards(root) == []
    assert main(["verify", str(root), "--no-progress"]) == 0
    path = root / shard_name(1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = verify_shards(root)
    assert problems and all(p.startswith("shard-00001.h5: ") for p in problems)
    assert any("sha256 mismatch" in p for p in problems)
    capsys.readouterr()
    assert main(["verify", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-00001.h5" in err and "shard-00000.h5" not in err


def test_verify_finds_nan_and_missing_files(tmp_path: Path):
    root = _write(tmp_path / "s")
    images = _images(3, 0)
    images[1, 0, 0, 0, 0] = np.nan  # a preprocessing bug: NaN written with a valid checksum
    write_shard(root / shard_name(0), images, _subjects(0, 3), voxel_mm=4.0, affine=np.eye(4),
                preprocess={"shape": list(SHAPE)}, preprocess_hash="abc")
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["shards"][0]["sha256"] = sha256_file(root / shard_name(0))  # sha256 fine, content not
    write_json(root / MANIFEST_NAME, data)
    (root / shard_name(1)).unlink()
    problems = verify_shards(root)
    assert "shard-00000.h5: volume 1 (100001) has NaN/Inf voxels" in problems
    assert "shard-00001.h5: file missing" in problems
    with h5py.File(root / shard_name(0), "r+") as f:  # rewritten through h5py: HDF5 recomputes the chunk checksum
        f["image"][2] = images[2] + 1
    problems = verify_shards(root)
    assert any(p.startswith("shard-00000.h5: subject 100002 (volume 2): the volume was rewritten") for p in problems), problems


def test_verify_missing_manifest_exits_2(tmp_path: Path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err


def test_partial_records_and_failures_csv(tmp_path: Path):
    write_partial(tmp_path, 3, {"sha256": "x", "age": None})
    assert read_partial(tmp_path, 3) == {"sha256": "x", "age": None}
    assert read_partial(tmp_path, 4) is None
    (tmp_path / "shard-00005.json").write_text("{trunc")
    assert read_partial(tmp_path, 5) is None
    write_failures(
        tmp_path / "failures.csv",
        [{"subject": "2", "file": "b", "reason": "r, with comma"}, {"subject": "1", "file": "a", "reason": "x"}],
    )
    assert (tmp_path / "failures.csv").read_text() == 'subject,file,reason\n1,a,x\n2,b,"r, with comma"\n'
