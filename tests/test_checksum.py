"""The parts' checksums (schemas.checksum): known values, chaining, and what records carry."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.checksum import CHECKSUMS, DEFAULT_CHECKSUM, checksum, running_sample_checksums
from schemas.manifest import ArrayRecord, read_manifest, read_seal, part_group_path, part_seal_path

CHECK_INPUT = np.frombuffer(b"123456789", dtype=np.uint8)


def test_known_check_values():
    # the catalogue's check values of CRC-32/ISO-HDLC (zlib) and CRC-32/ISCSI (Castagnoli)
    assert checksum(CHECK_INPUT, algorithm="crc32") == 0xCBF43926
    assert checksum(CHECK_INPUT, algorithm="crc32c") == 0xE3069283
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        checksum(CHECK_INPUT, algorithm="md5")


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_running_values_chain_over_samples(algorithm):
    rows = np.arange(120, dtype=np.uint16).reshape(20, 6)
    offsets = np.array([0, 3, 3, 11, 20])  # the second sample is empty
    values = running_sample_checksums(rows, offsets, algorithm)
    assert len(values) == 4 and values[0] == values[1]
    assert values[-1] == checksum(rows, 0, algorithm)
    for i in range(1, 4):  # each sample checks on its own, from the value before it
        assert checksum(rows[offsets[i] : offsets[i + 1]], values[i - 1], algorithm) == values[i]
    assert checksum(rows[:3], 0, algorithm) == values[0]
    # one flipped bit changes every later running value
    damaged = rows.copy()
    damaged[5, 2] ^= 1
    assert running_sample_checksums(damaged, offsets, algorithm)[2:] != values[2:]


def test_records_name_their_checksum_and_read_legacy_ones():
    record = ArrayRecord(shape=(3,), crc32=7, stored_bytes=10, checksum="crc32c")
    assert record.to_dict()["checksum"] == "crc32c" and ArrayRecord.from_dict(record.to_dict()) == record
    legacy = {"shape": [3], "crc32": 7, "stored_bytes": 10}  # written before the key existed
    assert ArrayRecord.from_dict(legacy).checksum == "crc32"
    assert "checksum" not in ArrayRecord.from_dict(legacy).to_dict()  # re-sealed as it was
    with pytest.raises(ValueError, match="unknown checksum 'xxh3'"):
        ArrayRecord.from_dict({**legacy, "checksum": "xxh3"})


def test_new_parts_record_crc32c_of_their_arrays(tiny_cache):
    import zarr

    manifest = read_manifest(tiny_cache)
    entry = manifest.parts[0]
    seal = read_seal(part_seal_path(tiny_cache, entry))
    group = zarr.open_group(str(part_group_path(tiny_cache, entry)), mode="r")
    for name, record in seal.arrays.items():
        assert record.checksum == DEFAULT_CHECKSUM == "crc32c"
        assert record.crc32 == checksum(np.asarray(group[name][...]), 0, "crc32c"), name
