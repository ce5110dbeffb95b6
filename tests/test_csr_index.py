"""CSR with int32 or int64 indices (utils.lab.measure.to_csr, csr_bytes, csr_index_bytes)."""

import io

import pytest
import torch

from utils.lab.measure import csr_bytes, csr_index_bytes, to_csr


def small() -> torch.Tensor:
    w = torch.zeros(3, 4)
    w[0, 1], w[2, 3] = 1.0, 2.0
    return w


@pytest.mark.parametrize("dtype, size", [(torch.int64, 8), (torch.int32, 4)])
def test_index_bytes_follow_the_index_dtype(dtype, size):
    csr = to_csr(small(), dtype)
    assert csr.col_indices().dtype == csr.crow_indices().dtype == dtype
    assert (
        csr_index_bytes(csr) == 2 * size + 4 * size
    )  # one column index per value, rows + 1 pointers
    assert csr_bytes(small(), dtype) == 2 * 4 + csr_index_bytes(csr)
    assert torch.equal(csr.to_dense(), small())


def test_int32_csr_survives_torch_save():
    buf = io.BytesIO()
    torch.save(to_csr(small(), torch.int32), buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)  # our own file; skips the O(nnz) invariant scan
    assert back.col_indices().dtype == torch.int32 and torch.equal(back.to_dense(), small())


def test_other_index_dtypes_are_refused():
    with pytest.raises(ValueError, match="int64 or torch.int32"):
        to_csr(small(), torch.int16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_saved_csr_file_holds_what_csr_bytes_counts(dtype):
    """torch.save writes whole storages: no index buffer larger than the CSR may ride along."""
    from utils.lab.measure import saved_bytes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(120, 400, generator=g) * (torch.rand(120, 400, generator=g) < 0.1)
    csr = to_csr(w, dtype)
    for part in (csr.crow_indices(), csr.col_indices(), csr.values()):
        assert part.untyped_storage().nbytes() == part.numel() * part.element_size()
    overhead = len(saved_bytes(csr)) - csr_bytes(w, dtype)
    assert 0 < overhead < 2500  # the zip container and pickle, not a second index array
