"""Padding to a multiple of N and tiled inference with overlap blending (leaf module: torch only)."""
import math

import torch
import torch.nn.functional as F

MIN_TILE = 32            # smallest tile side (pixels)
TILE_MULTIPLE = 8        # tiles are rounded up to a multiple of this


def pad_to_multiple(x, multiple=8, mode='reflect', minimum=0):
    """Pad the last two dims of ``x`` at the bottom/right up to a multiple of ``multiple`` (and to
    at least ``minimum`` pixels).

    Returns ``(padded, (h, w))`` with the original size, for :func:`crop_to`. Reflect padding
    needs the pad to be smaller than the side; tiny inputs fall back to replicate padding.
    """
    h, w = x.shape[-2:]
    ph, pw = max((-h) % multiple, minimum - h), max((-w) % multiple, minimum - w)
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == 'reflect' and (ph >= h or pw >= w):
        mode = 'replicate'
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def center_crop_to_multiple(x, multiple):
    """Crop the last two dims of ``x`` to a multiple of ``multiple``, as the published all-in-one
    test scripts do (``crop_img(image, base=16)``): ``h % multiple`` rows are removed, ``h % multiple
    // 2`` of them at the top, the rest at the bottom; the same for columns (481x321 -> 480x320)."""
    h, w = x.shape[-2:]
    dh, dw = h % multiple, w % multiple
    if h - dh < 1 or w - dw < 1:
        raise ValueError(f'a {w}x{h} image is smaller than the crop multiple {multiple}')
    return x[..., dh // 2:h - dh + dh // 2, dw // 2:w - dw + dw // 2]


def crop_to(x, size):
    """Inverse of :func:`pad_to_multiple` (works on tensors and on lists of tensors)."""
    h, w = size
    if isinstance(x, (list, tuple)):
        return type(x)(crop_to(v, size) for v in x)
    return x[..., :h, :w]


def _rounded(tile, multiple=TILE_MULTIPLE):
    """``tile`` rounded up to a multiple of ``multiple``."""
    return int(math.ceil(tile / multiple) * multiple)


def _starts(length, tile, stride):
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _blend_window(th, tw, overlap, device, dtype):
    """Weights that ramp linearly from ~0 to 1 over ``overlap`` pixels at each tile edge."""

    def ramp(n):
        w = torch.ones(n, device=device, dtype=dtype)
        if overlap > 0 and n > 2 * overlap:
            r = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
            w[:overlap] = r
            w[-overlap:] = r.flip(0)
        return w

    return ramp(th)[:, None] * ramp(tw)[None, :]


def tiled_forward(fn, x, tile, overlap=16, multiple=8):
    """Run ``fn`` (image batch -> same-size image batch) over overlapping tiles and blend them.

    ``tile`` is the largest tile side in pixels (rounded up to ``multiple``), ``overlap`` how much
    neighbouring tiles share; inside the overlap the outputs are averaged with linear ramps, so
    there are no seams. Along each side the image gets as many tiles as ``tile`` needs, each no longer
    than they must be to cover it (:func:`tile_shape`), so little is computed twice. Memory is that of
    one tile. Images no larger than a tile run in one go.
    """
    b, _, h, w = x.shape
    tile = _rounded(tile, multiple)
    if overlap >= tile:
        raise ValueError(f'tile overlap ({overlap}) must be smaller than the tile size ({tile})')
    if h <= tile and w <= tile:
        padded, size = pad_to_multiple(x, multiple)
        return crop_to(fn(padded), size)
    th, tw = tile_shape(h, w, tile, overlap, multiple)
    out = weight = None
    for top in _starts(h, th, th - overlap):
        for left in _starts(w, tw, tw - overlap):
            patch = x[..., top:top + th, left:left + tw]
            padded, size = pad_to_multiple(patch, multiple)
            y = crop_to(fn(padded), size)
            win = _blend_window(y.shape[-2], y.shape[-1], overlap, y.device, y.dtype)
            if out is None:
                out = y.new_zeros((b, y.shape[1], h, w))
                weight = y.new_zeros((1, 1, h, w))
            out[..., top:top + y.shape[-2], left:left + y.shape[-1]] += y * win
            weight[..., top:top + y.shape[-2], left:left + y.shape[-1]] += win
    return out / weight


def _tiles_along(length, tile, overlap):
    """How many tiles of side ``tile`` (advancing by tile - overlap) :func:`tiled_forward` puts along ``length``."""
    return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1


def tile_count(height, width, tile, overlap):
    """Forwards :func:`tiled_forward` makes for an image of this size."""
    tile = _rounded(tile)
    if height <= tile and width <= tile:
        return 1
    return _tiles_along(height, tile, overlap) * _tiles_along(width, tile, overlap)


def _side_along(length, tile, overlap, multiple=TILE_MULTIPLE):
    """The side that covers ``length`` with as many tiles as side ``tile`` needs there, no longer than that
    (n tiles of side t advancing by t - overlap cover n (t - overlap) + overlap pixels)."""
    n = _tiles_along(length, tile, overlap)
    if n == 1:
        return tile
    return min(tile, _rounded(math.ceil((length - overlap) / n) + overlap, multiple))


def tile_shape(height, width, tile, overlap, multiple=TILE_MULTIPLE):
    """``(tile height, tile width)`` that :func:`tiled_forward` uses for an image of this size with tiles of at
    most ``tile`` px: each side as short as covering the image in :func:`tile_count`'s tiles allows (a
    1152x864 photo in tiles of at most 592 px: 2 x 2 tiles of 592x448 px, not 592x592)."""
    tile = _rounded(tile, multiple)
    return (min(height, _side_along(height, tile, overlap, multiple)),
            min(width, _side_along(width, tile, overlap, multiple)))


def balanced_tile(height, width, tile, overlap):
    """The smallest tile side (a multiple of TILE_MULTIPLE, at most ``tile``) that covers a height x width
    image in no more tiles than ``tile`` does: the same number of forwards, each on a smaller tile, so
    that less is computed twice where tiles overlap (a 1152x864 photo in tiles of at most 832 px: four
    of 592 px, 1.4 megapixels computed, instead of four of 832 px, 2.8 megapixels; :func:`tiled_forward`
    then makes them 592x448, 1.06 megapixels)."""
    tile = _rounded(tile)
    if height <= tile and width <= tile:
        return tile
    side = _rounded(max(tile_shape(height, width, tile, overlap)))
    return max(min(side, tile), min(tile, MIN_TILE))


def describe_tiles(height, width, tile, overlap):
    """'4 tiles of 592 px (592x448) with 32 px overlap': how :func:`tiled_forward` tiles an image of this size."""
    th, tw = tile_shape(height, width, tile, overlap)
    shape = f' ({tw}x{th})' if (th, tw) != (_rounded(tile),) * 2 else ''
    return f'{tile_count(height, width, tile, overlap)} tiles of {tile} px{shape} with {overlap} px overlap'


def check_tiling(tile, overlap, min_stride=1, names=('--tile', '--tile-overlap')):
    """None when ``tile``/``overlap`` make valid tiles, else the reason (naming the options)."""
    if tile is None:
        return None
    if tile < MIN_TILE:
        return f'{names[0]} {tile}: expected at least {MIN_TILE} pixels'
    if overlap < 0:
        return f'{names[1]} {overlap}: expected 0 or more pixels'
    if overlap >= tile:
        return (f'{names[1]} ({overlap} px) must be smaller than {names[0]} ({tile} px): each tile advances by '
                f'tile - overlap pixels')
    if tile - overlap < min_stride:
        return (f'{names[0]} {tile} with {names[1]} {overlap} advances by {tile - overlap} px per tile; at least '
                f'{min_stride} px are needed (use a smaller overlap)')
    return None
