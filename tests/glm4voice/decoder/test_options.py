"""Decoder options: the CUDA graph batch sizes a given number of conversations needs."""

import pytest

from glm4voice.decoder.options import DEFAULT_GRAPH_BATCH_SIZES, graph_batch_sizes_for


@pytest.mark.parametrize(
    "most_blocks, expected",
    [(1, (1,)), (4, (1, 2, 4)), (5, (1, 2, 4, 8)), (32, (1, 2, 4, 8, 16, 32)), (1000, DEFAULT_GRAPH_BATCH_SIZES)],
)
def test_graph_batch_sizes_cover_the_most_blocks_decoded_together(most_blocks, expected):
    assert graph_batch_sizes_for(most_blocks) == expected
    assert graph_batch_sizes_for(3, sizes=(2, 6)) == (2, 6)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_graph_batch_sizes_need_a_positive_count(bad):
    with pytest.raises(ValueError, match="most_blocks"):
        graph_batch_sizes_for(bad)
