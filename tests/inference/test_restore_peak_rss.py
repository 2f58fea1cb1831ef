"""The memory budget holds for a real process: vlunet-restore in a subprocess restores a photo that would not
fit whole, in the tiles its budget allows, and the kernel's peak resident set of that process (ru_maxrss)
stays within the budget (scripts/check_restore_memory.py does the same for a 12-megapixel photo)."""
import json
import os
import sys

import torch

import vlunet  # noqa: F401
from vlunet.archs.card import get_card

from conftest import REPO, write_yaml

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import check_restore_memory as crm  # noqa: E402

TINY = {'type': 'Restormer', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1, 'heads': [1, 1, 1, 1]}
MiB = 2**20


def test_a_photo_larger_than_the_budget_restores_in_tiles_below_the_budget(tmp_path):
    torch.manual_seed(0)
    net = get_card('Restormer').arch_class(**{k: v for k, v in TINY.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, tmp_path / 'net.pth')
    opt = write_yaml(tmp_path / 'opt.yml', {'name': 't', 'network_g': TINY,
                                            'path': {'pretrain_network_g': str(tmp_path / 'net.pth')}})
    (tmp_path / 'in').mkdir()
    width, height = crm.photo_size(2.0)
    crm.write_photo(str(tmp_path / 'in' / 'photo.png'), width, height)
    # what a fresh vlunet-restore holds with this network and a tiny image (its own peak, not this test
    # process's, which grows with the tests run before it); 200 MiB above it is far less than the whole
    # photo needs (about 1.2 KB per pixel for this network, ~2.4 GB)
    (tmp_path / 'tiny').mkdir()
    crm.write_photo(str(tmp_path / 'tiny' / 'tiny.png'), 32, 32)
    status, baseline, _, _, err = crm.run_restore(
        ['-opt', opt, '-i', tmp_path / 'tiny', '-o', tmp_path / 'tiny_out', '--device', 'cpu'], threads=1,
        env={'VLUNET_CACHE_DIR': str(tmp_path / 'cache')}, timeout=600)
    assert status == 0, err[-3000:]
    budget = baseline + 200 * MiB
    status, peak, seconds, out, err = crm.run_restore(
        ['-opt', opt, '-i', tmp_path / 'in', '-o', tmp_path / 'out', '--device', 'cpu', '--max-memory', budget],
        threads=1, env={'VLUNET_CACHE_DIR': str(tmp_path / 'cache')}, timeout=600)
    assert status == 0, err[-3000:]
    row = json.load(open(tmp_path / 'out' / 'report.json'))['images'][0]
    why = json.dumps(dict(row, baseline_mib=baseline / MiB, budget_mib=budget / MiB, peak_mib=peak / MiB))
    assert row['tiles'] > 1 and 'tiled by the memory budget' in row['tiling'], why
    assert 0 < peak <= budget, why
