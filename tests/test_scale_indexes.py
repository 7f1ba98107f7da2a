"""`hific.scale_indexes` gives exactly compressai's `GaussianConditional.build_indexes`: the
latent coder's table choice is part of the bitstream, so it must agree to the last index."""

import torch

from illm.models._compressai import GaussianConditional
from illm.models.hific import scale_indexes, scale_table


def test_scale_indexes_equal_compressai_build_indexes():
    bottleneck = GaussianConditional(scale_table=None)
    bottleneck.update_scale_table(scale_table(), force=True)
    table = bottleneck.scale_table
    torch.manual_seed(0)
    scales = torch.cat(
        [
            torch.rand(20000) * 300,  # across and beyond the table
            torch.rand(2000) * 0.2,  # below its first scale and the lower bound
            table,  # exactly on table scales
            torch.nextafter(table, torch.full_like(table, 1e9)),  # just above them
            torch.nextafter(table, torch.zeros_like(table)),  # just below them
            torch.tensor([0.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e30]),
        ]
    ).reshape(1, -1, 1, 1)
    expected = bottleneck.build_indexes(scales)
    actual = scale_indexes(bottleneck, scales)
    assert actual.dtype == expected.dtype == torch.int32 and actual.shape == expected.shape
    assert torch.equal(actual, expected)
    assert len(set(expected.flatten().tolist())) == len(table)  # every table entry was chosen
