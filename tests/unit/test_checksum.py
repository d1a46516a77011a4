"""The two volume checksums: Fletcher-32 as HDF5 computes it, XXH3-64 as the xxhash library does."""

from __future__ import annotations

import numpy as np
import xxhash

from brainage_hpc.data.checksum import fletcher32, fletcher32_equal, xxh3


def test_xxh3_is_the_librarys_digest_of_the_bytes() -> None:
    vol = np.random.default_rng(0).standard_normal((1, 7, 9, 11)).astype(np.float16)
    want = xxhash.xxh3_64_intdigest(vol.tobytes())
    assert xxh3(vol) == want
    assert xxh3(vol.tobytes()) == want
    assert xxh3(memoryview(vol.reshape(-1).view(np.uint8))) == want
    assert xxh3(np.asfortranarray(vol[0])) == xxhash.xxh3_64_intdigest(vol[0].tobytes())  # the values in C order
    assert 0 <= want < 2**64


def test_fletcher32_cannot_see_a_zero_turned_into_nan_but_xxh3_does() -> None:
    """Why shards record XXH3-64: modulo 65535, the words 0x0000 and 0xFFFF weigh the same."""
    words = np.random.default_rng(1).integers(1, 0xFFFF, size=4096, dtype=np.uint16)
    words[100] = 0x0000  # +0.0 in float16
    changed = words.copy()
    changed[100] = 0xFFFF  # a NaN in float16
    assert fletcher32_equal(fletcher32(words), fletcher32(changed))
    assert xxh3(words) != xxh3(changed)
