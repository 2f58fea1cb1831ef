import numpy as np
import pytest
import torch

from vlunet.utils.tiling import crop_to, describe_tiles, pad_to_multiple, tile_count, tile_shape, tiled_forward


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


def test_each_side_of_a_tile_is_as_short_as_its_tile_count_allows():
    # a 1152x864 photo in tiles of at most 592 px, 32 px overlap: 2 x 2 tiles of 592x448, not 592x592
    assert tile_shape(864, 1152, 592, 32) == (448, 592)
    assert describe_tiles(864, 1152, 592, 32) == '4 tiles of 592 px (592x448) with 32 px overlap'
    calls = []
    x = torch.rand(1, 3, 864, 1152)
    out = tiled_forward(lambda t: calls.append(tuple(t.shape[-2:])) or t * 2, x, 592, 32)
    assert calls == [(448, 592)] * 4 and torch.allclose(out, x * 2, rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(40, 320, 2))
        tile = int(rng.integers(8, 40)) * 8
        overlap = int(rng.integers(0, min(tile // 2, 40)))
        calls.clear()
        out = tiled_forward(lambda t: calls.append(tuple(t.shape[-2:])) or t + 1, torch.zeros(1, 1, h, w),
                            tile, overlap)
        assert torch.allclose(out, torch.ones(1, 1, h, w), rtol=0, atol=1e-6), (h, w, tile, overlap)
        th, tw = tile_shape(h, w, tile, overlap)
        padded_shape = (-(-th // 8) * 8, -(-tw // 8) * 8)
        assert len(calls) == tile_count(h, w, tile, overlap) and set(calls) <= {padded_shape}
        assert th <= min(h, tile) and tw <= min(w, tile)
        # as many tiles as square tiles of the full side need, but no side could be 8 px shorter
        for side, length in ((th, h), (tw, w)):
            if side < length and side - 8 > overlap:
                assert tile_count(length, 1, side - 8, overlap) > tile_count(length, 1, tile, overlap)
