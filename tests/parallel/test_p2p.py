"""parallel/p2p.py: what a transfer's header tells its receiver, and flat buckets."""

import pytest
import torch

from distconvnet.parallel.p2p import (decode_layout, empty, encode_layout, flat_views, laid_out,
                                      layout_of)


@pytest.mark.parametrize("tensor", [torch.randn(3, 8, 5, 5).to(memory_format=torch.channels_last),
                                    torch.randn(3, 10).bfloat16(), torch.randn(0, 4, 2, 2)],
                         ids=["channels_last", "bf16", "no rows"])
def test_a_transfer_header_gives_the_receiver_the_senders_layout(tensor):
    layout = layout_of(tensor)
    assert decode_layout(encode_layout(layout, tensor.device).tolist()) == layout
    rows = tensor.shape[0]
    sent, buffer = laid_out(tensor, layout, rows), empty(layout, rows, tensor.device)
    assert (buffer.shape, buffer.stride(), buffer.dtype) == (sent.shape, sent.stride(), sent.dtype)
    with pytest.raises(RuntimeError, match="receiver expects"):
        laid_out(tensor, layout, rows + 1)


def test_flat_views_cover_the_buffer_once_in_each_tensors_layout():
    tensors = [torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last), torch.randn(5),
               torch.randn(2, 3)]
    flat, views = flat_views(tensors)
    torch._foreach_copy_(views, tensors)
    for view, tensor in zip(views, tensors):
        assert view.stride() == tensor.stride() and torch.equal(view, tensor)
    flat.copy_(torch.arange(flat.numel()))
    assert sorted(torch.cat([v.flatten() for v in views]).tolist()) == list(range(flat.numel()))
