"""Issue 14, shard cases: damaged shards are one-line errors naming shard and subject, never trained on.

T1  corrupt header / truncated shard / manifest shape edited -> one line naming the shard, exit 1.
S3  random finite values over a train subject's volume -> `train` stops with a line naming shard and subject.
Item 4: the per-volume checksum is verified on every read (direct and HDF5-filter paths); old shards
without it are read after exactly one warning. Issue 17: the XXH3-64 record (image_xxh3) catches what Fletcher-32
cannot; without the record, Fletcher-32 still verifies.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from brainage_hpc.cli import main
from brainage_hpc.data.dataset import BrainSampler, ShardDataset
from brainage_hpc.data.shards import MANIFEST_NAME, ShardError, ShardReader, load_manifest, shard_name
from brainage_hpc.ingest.shard_writer import write_json, write_shard
from tests.conftest import train_overrides

pytestmark = pytest.mark.slow
SEED = 0


@pytest.fixture()
def shards(tiny_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's 40-subject 32^3 shards (two or more shards of 16)."""
    dst = tmp_path / "shards"
    shutil.copytree(tiny_shards, dst)
    return dst


def _train(shards: Path, run_dir: Path, capsys: pytest.CaptureFixture, workers: int) -> tuple[int, str]:
    extra = ["train.backend=single", "train.precision=32", "train.epochs=1", f"train.seed={SEED}",
             "data.batch_size=4", f"data.num_workers={workers}"]
    capsys.readouterr()
    rc = main(["train", "--config", "cnn_demo", "--run-dir", str(run_dir), "--resume", "none",
               *train_overrides(shards, "cnn3d", *extra)])
    return rc, capsys.readouterr().err


def _error_line(err: str) -> str:
    """The CLI's error: exactly one line starting with 'brainage train: error:', and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("brainage train: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _first_train_subject(root: Path) -> tuple[str, int, int]:
    """A train subject the first epoch certainly reads (first of the sampler's order), its shard and index."""
    ds = ShardDataset(root, "train")
    sampler = BrainSampler(len(ds), 1, 0, shuffle=True, seed=SEED, labels=ds.labels)
    sid = ds.subject_ids[int(sampler.epoch_indices(0)[0])]
    rec = load_manifest(root).subjects[sid]
    return sid, int(rec["shard"]), int(rec["index"])


def _chunk_span(path: Path, index: int) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f["image"].id.get_chunk_info(index)
    return int(info.byte_offset), int(info.size)


def _random_finite(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(7).uniform(-3, 3, size=shape).astype(np.float16)


def _flip_byte(path: Path, pos: int, mask: int) -> None:
    """XOR the byte at ``pos`` of ``path`` with ``mask``, in place."""
    with open(path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ mask]))


def _one_shard_set(root: Path, images: np.ndarray, compression: str) -> None:
    """``root``: one shard of ``images`` (N, 1, 8, 9, 7), subjects 100000.., and its manifest, all in ``train``."""
    root.mkdir()
    subjects = [{"id": f"10000{i}", "age": 25.0, "age_bin": 1, "sex": i % 2} for i in range(len(images))]
    sha = write_shard(root / shard_name(0), images, subjects, voxel_mm=4.0, affine=np.eye(4), preprocess={},
                      preprocess_hash="h", compression=compression)
    write_json(root / MANIFEST_NAME, {
        "format_version": 1, "shape": [8, 9, 7], "voxel_mm": 4.0, "affine": np.eye(4).tolist(), "preprocess": {},
        "preprocess_hash": "h", "shards": [{"file": shard_name(0), "sha256": sha, "n": len(images)}],
        "subjects": {s["id"]: {"shard": 0, "index": i, "age": 25.0, "age_bin": 1, "sex": s["sex"]} for i, s in enumerate(subjects)},
        "splits": {"train": [s["id"] for s in subjects]},
    })


@pytest.mark.parametrize("damage", ["corrupt_header", "truncated", "manifest_shape"])
def test_T1_broken_shard_is_one_line_naming_it(shards: Path, tmp_path: Path, capsys, damage: str) -> None:
    m = load_manifest(shards)
    sid, k, _ = _first_train_subject(shards)
    path = shards / shard_name(k)
    if damage == "corrupt_header":
        raw = bytearray(path.read_bytes())
        raw[:64] = bytes(range(64))
        path.write_bytes(bytes(raw))
        expect = "not a readable HDF5 file"
    elif damage == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
        expect = "not a readable HDF5 file"
    else:
        data = json.loads((shards / MANIFEST_NAME).read_text())
        data["shape"] = [48, 56, 48]
        write_json(shards / MANIFEST_NAME, data)
        expect = "volumes are 32x32x32 but manifest.json says 48x56x48"
        path = shards / m.shards[0]["file"]  # every shard disagrees; the first one is named
    rc, err = _train(shards, tmp_path / "run", capsys, workers=2)
    line = _error_line(err)
    assert rc == 1, err[-2000:]
    assert path.name in line and expect in line, line
    assert not list((tmp_path / "run").glob("ckpt-*")), "trained on a broken shard set"


@pytest.mark.parametrize("how", ["h5py_rewrite", "bytes_on_disk"])
@pytest.mark.parametrize("workers", [0, 2])
def test_S3_train_refuses_a_damaged_train_volume(shards: Path, tmp_path: Path, capsys, how: str, workers: int) -> None:
    sid, k, index = _first_train_subject(shards)
    path = shards / shard_name(k)
    if how == "h5py_rewrite":  # HDF5 recomputes the chunk's own checksum: caught by the one recorded at write time
        with h5py.File(path, "r+") as f:
            f["image"][index] = _random_finite(f["image"].shape[1:])
        expect = "rewritten after preprocessing"
    else:  # finite garbage straight into the chunk's bytes
        offset, size = _chunk_span(path, index)
        with open(path, "r+b") as fh:
            fh.seek(offset + 64)
            fh.write(_random_finite((size // 4,)).tobytes())
        expect = "checksum mismatch"
    rc, err = _train(shards, tmp_path / "run", capsys, workers=workers)
    line = _error_line(err)
    assert rc == 1, err[-2000:]
    assert f"{path.name}: subject {sid} (volume {index})" in line and expect in line, line
    assert not list((tmp_path / "run").glob("ckpt-*")), "a checkpoint was written after reading damaged data"


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_item4_checksum_checked_on_every_read(tmp_path: Path, compression: str) -> None:
    """Direct chunk reads (uncompressed) and HDF5's filter path (compressed) both refuse a flipped byte."""
    root = tmp_path / "s"
    images = np.random.default_rng(1).standard_normal((3, 1, 8, 9, 7)).astype(np.float16)
    _one_shard_set(root, images, compression)
    reader = ShardReader(root)
    np.testing.assert_array_equal(reader.read("100001"), images[1])  # verified read of the intact volume
    reader.close()
    offset, size = _chunk_span(root / shard_name(0), 1)
    _flip_byte(root / shard_name(0), offset + size // 3, 0x10)
    reader = ShardReader(root)
    with pytest.raises(ShardError, match=r"shard-00000.h5: subject 100001 \(volume 1\): checksum mismatch"):
        reader.read("100001")
    np.testing.assert_array_equal(reader.read("100002"), images[2])  # the neighbours are intact
    ds = ShardDataset(root, "train")
    with pytest.raises(ShardError, match="subject 100001"):
        ds.read_batch([0, 1, 2])


def _strip_checksums(src: Path, dst: Path) -> None:
    """Rewrite a shard as the writer did before checksums: no fletcher32 filter, no image_fletcher32."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for name, value in f.attrs.items():
            g.attrs[name] = value
        img = f["image"]
        g.create_dataset("image", data=img[()], chunks=img.chunks)
        for name in ("subject_id", "age", "age_bin", "sex"):
            f.copy(name, g)


def test_item4_old_shards_are_read_after_one_warning(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = load_manifest(shards)
    for entry in m.shards:
        path = shards / entry["file"]
        _strip_checksums(path, path.with_suffix(".old"))
        path.with_suffix(".old").replace(path)
    with caplog.at_level(logging.WARNING, logger="brainage_hpc.data.shards"):
        train = ShardDataset(shards, "train")
        val = ShardDataset(shards, "val")
        batch = train.read_batch([0, 1])
        val.read_batch([0])
    warnings = [r for r in caplog.records if "no per-volume checksum" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert batch["image"].shape == (2, 1, 32, 32, 32)
    np.testing.assert_array_equal(batch["image"][1].numpy(), ShardReader(shards).read(train.subject_ids[1]))


@pytest.mark.parametrize("where", ["payload", "stored_checksum"])
def test_item4_batch_reads_verify_on_the_helper_thread(shards: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_batch computes checksums on a helper thread: a flipped payload byte or a flipped stored-checksum byte
    is still 'checksum mismatch' naming the subject, the batch buffer goes back to the pool, neighbours read fine."""
    from brainage_hpc.data.batch_buffers import BufferPool, recycle

    monkeypatch.setattr(ShardReader, "defer_checks_from_bytes", 0)  # 32^3 volumes: defer them too
    ds = ShardDataset(shards, "train")
    k, index = int(ds._shard[1]), int(ds._index[1])
    offset, size = _chunk_span(shards / shard_name(k), index)
    pos = offset + size // 2 if where == "payload" else offset + size - 2  # the last 4 bytes hold the checksum
    _flip_byte(shards / shard_name(k), pos, 0x01)
    ds = ShardDataset(shards, "train")
    ds.buffer_pool = BufferPool()
    with pytest.raises(ShardError, match=rf"{shard_name(k)}: subject {ds.subject_ids[1]} \(volume {index}\): checksum mismatch"):
        ds.read_batch([0, 1, 2])
    batch = ds.read_batch([0, 2, 3])
    assert ds.buffer_pool.allocated == 1, "the failed batch's buffer was not handed back"
    reader = ShardReader(shards)
    for j, i in enumerate([0, 2, 3]):
        np.testing.assert_array_equal(batch["image"][j].numpy(), reader.read(ds.subject_ids[i]))
    recycle(batch["image"])


def test_item4_two_damaged_volumes_in_a_batch_report_the_first_read(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last volume of a batch is checked inline while the helper thread checks the others: with the first and
    the last damaged, the error still names the first (read order), and the buffer goes back to the pool."""
    from brainage_hpc.data.batch_buffers import BufferPool

    monkeypatch.setattr(ShardReader, "defer_checks_from_bytes", 0)
    ds = ShardDataset(shards, "train")
    for i in (0, 3):
        k, index = int(ds._shard[i]), int(ds._index[i])
        offset, size = _chunk_span(shards / shard_name(k), index)
        _flip_byte(shards / shard_name(k), offset + size // 3, 0x10)
    ds = ShardDataset(shards, "train")
    ds.buffer_pool = BufferPool()
    first = rf"subject {ds.subject_ids[0]} \(volume {int(ds._index[0])}\): checksum mismatch"
    with pytest.raises(ShardError, match=first):
        ds.read_batch([0, 1, 2, 3])
    with pytest.raises(ShardError, match=rf"subject {ds.subject_ids[3]} .*checksum mismatch"):
        ds.read_batch([1, 2, 4, 3])  # the last one alone: the inline check
    assert ds.buffer_pool.allocated == 1, "a failed batch's buffer was not handed back"


def _zero_word_span(path: Path, index: int) -> int:
    """File offset of a 16-bit word of volume ``index`` that holds +0.0 (0x0000)."""
    with h5py.File(path, "r") as f:
        vol = f["image"][index].reshape(-1)
    zeros = np.flatnonzero(vol.view(np.uint16) == 0)
    assert zeros.size, "the test volume has no +0.0 voxel"
    offset, _ = _chunk_span(path, index)
    return offset + 2 * int(zeros[zeros.size // 2])


@pytest.mark.parametrize("path", ["inline", "helper_thread"])
def test_item4_a_zero_turned_into_nan_is_caught(shards: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fletcher-32 (modulo 65535) cannot tell the words 0x0000 and 0xFFFF apart: a +0.0 voxel turned into a NaN passes
    it. The XXH3-64 recorded at write time refuses it, inline and on the helper thread."""
    from brainage_hpc.data.checksum import fletcher32, fletcher32_equal, stored_fletcher32

    root = shards
    if path == "helper_thread":
        monkeypatch.setattr(ShardReader, "defer_checks_from_bytes", 0)
    ds = ShardDataset(root, "train")
    k, index = int(ds._shard[1]), int(ds._index[1])
    shard = root / shard_name(k)
    pos = _zero_word_span(shard, index)
    with open(shard, "r+b") as fh:
        fh.seek(pos)
        assert fh.read(2) == b"\x00\x00"
        fh.seek(pos)
        fh.write(b"\xff\xff")
    offset, size = _chunk_span(shard, index)
    with open(shard, "rb") as fh:
        fh.seek(offset)
        chunk = np.frombuffer(fh.read(size), dtype=np.uint8)
    assert fletcher32_equal(fletcher32(chunk[:-4]), stored_fletcher32(chunk)), "Fletcher-32 saw it: the test proves nothing"
    ds = ShardDataset(root, "train")
    damaged = rf"{shard_name(k)}: subject {ds.subject_ids[1]} \(volume {index}\): checksum mismatch, the volume is damaged"
    with pytest.raises(ShardError, match=damaged):
        ds.read_batch([0, 1, 2])
    with pytest.raises(ShardError, match=damaged):
        ShardReader(root).read(ds.subject_ids[1])


def test_item4_xxh3_is_checked_after_the_hdf5_filter_path(tmp_path: Path) -> None:
    """A compressed shard goes through HDF5's filters (Fletcher-32); a volume rewritten through h5py is told apart as
    rewritten; given its new chunk checksum in image_fletcher32 too, it passes both, and only the XXH3-64 record
    refuses it."""
    from brainage_hpc.data.checksum import stored_fletcher32
    from brainage_hpc.data.shards import CHECKSUMS_NAME

    root = tmp_path / "lzf"
    images = np.random.default_rng(3).uniform(0.5, 1.5, (2, 1, 8, 9, 7)).astype(np.float16)
    _one_shard_set(root, images, "lzf")
    np.testing.assert_array_equal(ShardReader(root).read("100001"), images[1])
    with h5py.File(root / shard_name(0), "r+") as f:
        f["image"][1] = _random_finite(images.shape[1:])
    with pytest.raises(ShardError, match=r"subject 100001 \(volume 1\): the volume was rewritten after preprocessing"):
        ShardReader(root).read("100001")  # the digest mismatch, told apart with the recorded chunk checksum
    with h5py.File(root / shard_name(0), "r+") as f:
        f[CHECKSUMS_NAME][1] = stored_fletcher32(f["image"].id.read_direct_chunk((1, 0, 0, 0, 0))[1])
    with pytest.raises(ShardError, match=r"shard-00000.h5: subject 100001 \(volume 1\): checksum mismatch"):
        ShardReader(root).read("100001")
    np.testing.assert_array_equal(ShardReader(root).read("100000"), images[0])


def test_item4_a_damaged_digest_record_is_refused_not_trusted(shards: Path) -> None:
    """A changed value in image_xxh3 (the record, not the volume) is a damaged volume, never a silent pass; a record
    of the wrong length is a damaged HDF5 structure; without the record, Fletcher-32 still verifies every read."""
    from brainage_hpc.data.shards import DIGESTS_NAME

    ds = ShardDataset(shards, "train")
    k, index = int(ds._shard[1]), int(ds._index[1])
    shard = shards / shard_name(k)
    with h5py.File(shard, "r+") as f:
        f[DIGESTS_NAME][index] = np.uint64(int(f[DIGESTS_NAME][index]) ^ 1)
    with pytest.raises(ShardError, match=rf"subject {ds.subject_ids[1]} \(volume {index}\): checksum mismatch"):
        ShardDataset(shards, "train").read_batch([0, 1])
    with h5py.File(shard, "r+") as f:
        n = f[DIGESTS_NAME].shape[0]
        del f[DIGESTS_NAME]
        f.create_dataset(DIGESTS_NAME, data=np.zeros(n - 1, dtype=np.uint64))
    with pytest.raises(ShardError, match=rf"{shard_name(k)}: damaged HDF5 structure \(image_xxh3 holds"):
        ShardDataset(shards, "train").read_batch([1])
    with h5py.File(shard, "r+") as f:
        del f[DIGESTS_NAME]
    np.testing.assert_array_equal(ShardDataset(shards, "train").read_batch([1])["image"][0].numpy(),
                                  ShardReader(shards).read(ds.subject_ids[1]))
    offset, size = _chunk_span(shard, index)
    _flip_byte(shard, offset + size // 3, 0x10)  # Fletcher-32 sees an ordinary flip
    with pytest.raises(ShardError, match=rf"subject {ds.subject_ids[1]} \(volume {index}\): checksum mismatch"):
        ShardDataset(shards, "train").read_batch([0, 1])


def test_item4_a_shard_truncated_while_open_is_one_line(shards: Path) -> None:
    """The file shrinks under a running loader (another process rewrote it): the next read of a cut chunk says so."""
    ds = ShardDataset(shards, "train")
    ds.read_batch([0])  # the shard is open now
    k, index = int(ds._shard[0]), int(ds._index[0])
    last = max((i for i in range(len(ds)) if int(ds._shard[i]) == k), key=lambda i: int(ds._index[i]))
    assert int(ds._index[last]) > index
    offset, size = _chunk_span(shards / shard_name(k), int(ds._index[last]))
    with open(shards / shard_name(k), "r+b") as fh:
        fh.truncate(offset + size // 2)
    with pytest.raises(ShardError, match=rf"{shard_name(k)}: subject {ds.subject_ids[last]} .*truncated"):
        ds.read_batch([last])
