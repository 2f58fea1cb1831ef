"""Memory budgets (vlunet.inference.memory): sizes as people write them, the meter and the calibration
measured against allocations of known size, and the tile a budget chooses."""
import math
import os
import sys

import pytest
import torch

from vlunet.inference.memory import (KERNEL_CACHE_ENTRIES, SAFETY, MemoryBudgetError, MemoryMeter, MemoryModel, budget_pixel_limit,
                                     bound_kernel_cache, cached_model, calibrate, format_bytes, image_buffer_bytes, parse_memory,
                                     plan_tiles, return_freed_memory)
from vlunet.utils.tiling import balanced_tile, tile_count, tiled_forward

MiB, GiB = 2**20, 2**30


@pytest.mark.parametrize('text,expected', [('3G', 3 * GiB), ('3g', 3 * GiB), ('3GB', 3 * GiB), ('3GiB', 3 * GiB),
                                           ('512M', 512 * MiB), ('1.5G', int(1.5 * GiB)), ('800K', 800 * 1024),
                                           (' 2 G ', 2 * GiB), ('1000', 1000), (4096, 4096)])
def test_sizes_are_read_in_binary_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize('text', ['3X', 'G', '-1G', 'three', '1..5G', '0G', True])
def test_a_size_that_is_not_one_is_named(text):
    with pytest.raises(ValueError, match='--max-memory'):
        parse_memory(text)


def test_no_budget_and_readable_sizes():
    assert parse_memory(None) is None and parse_memory('') is None
    assert format_bytes(3 * GiB) == '3.0 GiB' and format_bytes(512 * MiB) == '512 MiB'
    assert budget_pixel_limit(3 * GiB) > 12_000_000  # a 12-megapixel photo is allowed under 3G


def test_the_meter_sees_an_allocation_and_its_peak():
    meter = MemoryMeter('cpu')
    if not meter.available:
        pytest.skip('no /proc on this system')
    import mmap
    meter.start()
    before = meter.in_use()
    # 64 MiB of fresh pages, touched: an anonymous mapping, since malloc may hand out heap pages that an earlier
    # test freed but the process still holds (the resident set would not grow; it did once in a full suite)
    block = mmap.mmap(-1, 64 * MiB)
    block.write(b'\x01' * (64 * MiB))
    peak = meter.peak()
    block.close()
    assert peak - before >= 60 * MiB


def test_calibration_measures_what_a_forward_allocates_per_pixel():
    """A fake network that allocates (and touches) exactly 4000 bytes per input pixel besides its output."""
    if not MemoryMeter('cpu').available:
        pytest.skip('no /proc on this system')

    def run(x):
        scratch = torch.ones(x.shape[-2] * x.shape[-1] * 1000)  # 4000 bytes per pixel
        return x * scratch[:1]

    model = calibrate(run, 'cpu')
    # the scratch (4000 B/px) and the output (12 B/px) are measured; allocator pages and RSS noise are small
    assert 3900 <= model.per_pixel <= 4600, model
    assert model.fixed < 8 * MiB, model
    assert len(model.samples) == 2 and model.samples[1][0] > model.samples[0][0]


def test_a_heap_full_of_freed_small_blocks_does_not_hide_the_forward():
    """120 MB of 200 KB blocks (under the mmap threshold, so in glibc's heap) freed below a block that
    stays: the free region is resident, and a 64 MB scratch served from it would read as nothing (the
    suite saw the smaller size read 0 in every round). The calibration gives those pages back first."""
    if not (MemoryMeter('cpu').available and return_freed_memory()):
        pytest.skip('needs /proc and glibc')
    blocks = [torch.ones(50_000) for _ in range(600)]
    stays = torch.ones(50_000)  # noqa: F841  (above the freed blocks in the heap)
    del blocks

    def run(x):
        scratch = torch.ones(x.shape[-2] * x.shape[-1] * 1000)  # 4000 bytes per pixel
        return x * scratch[:1]

    model = calibrate(run, 'cpu')
    assert model.samples[0][1] >= 60 * MiB and 3900 <= model.per_pixel <= 4600, model


def test_memory_freed_during_a_measured_forward_does_not_skew_the_calibration():
    """Another holder frees 128 MiB during the first measured forward (as the cyclic collector or a
    thread may, which happened once in a full suite): that forward's reading drops to about nothing, and
    the two sizes disagree; they are measured again, so the model stays what the network allocates."""
    if not MemoryMeter('cpu').available:
        pytest.skip('no /proc on this system')
    import mmap
    held = mmap.mmap(-1, 128 * MiB)
    held.write(b'\x01' * (128 * MiB))
    calls = []

    def run(x):
        calls.append(x.shape[-1])
        if len(calls) == 2 and not held.closed:  # the first forward after the warm-up
            held.close()
        scratch = torch.ones(x.shape[-2] * x.shape[-1] * 1000)  # 4000 bytes per pixel
        return x * scratch[:1]

    model = calibrate(run, 'cpu')
    assert held.closed and len(calls) == 5, calls  # warm-up, both sizes, both sizes again
    assert 3900 <= model.per_pixel <= 4600, model
    assert model.samples[0][1] >= 60 * MiB, model


def test_a_cached_model_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv('VLUNET_CACHE_DIR', str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return MemoryModel(1000.0, 10.0)

    description = {'arch': 'test', 'layout': str(tmp_path)}
    assert cached_model(description, measure).per_pixel == 10.0
    assert cached_model(description, measure).per_pixel == 10.0
    assert calls == [1] and (tmp_path / 'memory_models.json').is_file()
    from vlunet.inference import memory
    memory._MODELS.clear()  # a new process: read from the disk cache, not measured again
    assert cached_model(description, measure).fixed == 1000.0 and calls == [1]


def test_the_plan_runs_whole_what_fits_and_tiles_the_rest_within_the_budget():
    model = MemoryModel(fixed=10 * MiB, per_pixel=2000.0)
    in_use, budget = 500 * MiB, 3 * GiB
    small = plan_tiles(model, budget, in_use, 1, 1000, 800, 32)
    assert small.tile is None and 'whole image' in small.reason and small.estimate <= budget
    big = plan_tiles(model, budget, in_use, 1, 3000, 4000, 32)
    assert big.tile is not None and big.tile % 8 == 0 and big.estimate <= budget
    room = budget - in_use - image_buffer_bytes(1, 3000, 4000)
    assert model.forward_bytes(big.tile ** 2) <= room
    # as few forwards as the largest tile that fits (one 8 px larger would not), on tiles no larger than needed
    largest = next(t for t in range(8, 4008, 8) if model.forward_bytes((t + 8) ** 2) > room)
    assert tile_count(3000, 4000, big.tile, 32) == tile_count(3000, 4000, largest, 32)
    assert tile_count(3000, 4000, big.tile - 8, 32) > tile_count(3000, 4000, largest, 32)
    assert f'tiles of {big.tile} px' in big.reason and '3.0 GiB' in big.reason
    assert math.isclose(model.forward_bytes(1), SAFETY * (10 * MiB + 2000))


def test_tiles_are_no_larger_than_their_count_needs():
    # a 1152x864 photo that tiles of up to 832 px cover in 2 x 2: tiles of 592 px cover it in 2 x 2 too
    assert balanced_tile(864, 1152, 832, 32) == 592
    assert tile_count(864, 1152, 592, 32) == tile_count(864, 1152, 832, 32) == 4
    assert tile_count(864, 1152, 584, 32) > 4
    for h, w, tile, overlap in ((3008, 4016, 408, 32), (100, 1000, 64, 16), (513, 257, 128, 8), (50, 3000, 48, 32)):
        side = balanced_tile(h, w, tile, overlap)
        assert side % 8 == 0 and side <= tile and tile_count(h, w, side, overlap) == tile_count(h, w, tile, overlap)
        assert side == 32 or tile_count(h, w, side - 8, overlap) > tile_count(h, w, tile, overlap)
    assert balanced_tile(500, 400, 512, 32) == 512  # fits one tile: unchanged
    # the restored image is the same function of the input with the smaller tiles (blending covers every pixel)
    x = torch.rand(1, 3, 70, 90)
    assert torch.allclose(tiled_forward(lambda t: t * 2, x, balanced_tile(70, 90, 64, 16), 16), x * 2)


def test_a_budget_too_small_for_any_tile_is_one_clear_error():
    model = MemoryModel(fixed=10 * MiB, per_pixel=2000.0)
    with pytest.raises(MemoryBudgetError, match=r'photo.png \(4000x3000\) does not fit the memory budget of 1.0 GiB'):
        plan_tiles(model, GiB, 900 * MiB, 1, 3000, 4000, 32, what='photo.png')


_CACHE_PROBE = '''
import ctypes, os, sys, torch
if sys.argv[1] == 'vlunet':
    import vlunet  # noqa: F401
torch.set_num_threads(1)

class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks '
                'keepcost'.split()]

libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo

def in_use():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd

weight = torch.randn(24, 24, dtype=torch.bfloat16)
torch.randn(256, 24, dtype=torch.bfloat16) @ weight
before = in_use()
for rows in range(8, 208):  # 200 shapes of bf16 matrix product, each a computation of its own
    torch.randn(rows, 24, dtype=torch.bfloat16) @ weight
print(os.environ.get('LRU_CACHE_CAPACITY'), (in_use() - before) / 2**20)
'''


def _cache_probe(tmp_path, how, **env):
    import subprocess
    import sys
    script = tmp_path / 'probe.py'
    script.write_text(_CACHE_PROBE)
    environ = {k: v for k, v in os.environ.items() if k != 'LRU_CACHE_CAPACITY'}
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, grown = proc.stdout.split()
    return size, float(grown)


@pytest.mark.skipif(not (sys.platform.startswith('linux') and torch.backends.mkldnn.is_available()
                         and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason='needs glibc and oneDNN bf16 kernels')
def test_import_vlunet_bounds_the_cpu_cache_of_onednn_computations(tmp_path):
    default_size, default_grown = _cache_probe(tmp_path, 'plain')
    size, grown = _cache_probe(tmp_path, 'vlunet')
    assert default_size == 'None' and size == str(KERNEL_CACHE_ENTRIES)
    # 200 distinct products: PyTorch's default cache keeps all of them (about 0.2 MB each), vlunet's 32
    assert grown < default_grown - 20, (grown, default_grown)
    assert _cache_probe(tmp_path, 'vlunet', LRU_CACHE_CAPACITY='500')[0] == '500'  # the user's size wins


def test_a_cache_size_that_is_not_a_positive_integer_is_named(monkeypatch):
    monkeypatch.setenv('LRU_CACHE_CAPACITY', '0')
    with pytest.raises(ValueError, match=r"LRU_CACHE_CAPACITY='0'.*positive integer"):
        bound_kernel_cache()
    monkeypatch.setenv('LRU_CACHE_CAPACITY', '64')
    assert bound_kernel_cache() == 64
