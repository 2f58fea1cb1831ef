import pytest
import torch

from vlunet.utils.tiling import crop_to, pad_to_multiple, tiled_forward


def test_pad_and_crop_round_trip():
    x = torch.rand(1, 3, 37, 29)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (40, 32)
    assert torch.equal(crop_to(padded, size), x)
    same, _ = pad_to_multiple(torch.rand(1, 3, 16, 8), 8)
    assert same.shape[-2:] == (16, 8)
    tiny, _ = pad_to_multiple(torch.rand(1, 3, 3, 2), 8)  # reflect impossible -> replicate
    assert tiny.shape[-2:] == (8, 8)


def test_tiles_blend_without_seams():
    x = torch.rand(2, 3, 70, 53)
    conv = torch.nn.Conv2d(3, 3, 1)  # pointwise: tiled result must equal the full one

    def fn(t):
        assert t.shape[-1] % 8 == 0 and t.shape[-2] % 8 == 0 and t.shape[-1] <= 32
        return conv(t)

    with torch.no_grad():
        full = conv(x)
        tiled = tiled_forward(fn, x, tile=32, overlap=8)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValueError, match='overlap'):
        tiled_forward(lambda t: t, torch.rand(1, 3, 64, 64), tile=16, overlap=16)
