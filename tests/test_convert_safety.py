"""vlunet-convert never replaces its input: DST equal to SRC, or --clip-out equal to SRC or DST
(also through a symbolic link, ``..`` or a hard link) is refused; SRC is unchanged and nothing is
written."""
import os

import pytest
import torch

import vlunet  # noqa: F401  (registers the archs; must precede basicsr)
from basicsr.archs import build_network
from vlunet import convert as convert_mod

DGUNET = {'type': 'DGUNet', 'n_feat': 8, 'scale_unetfeats': 4, 'scale_orsnetfeats': 4, 'depth': 1}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = build_network(dict(DGUNET))
    path = tmp_path / 'published.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}, 'epoch': 3}, path)
    return path


def _listing(folder):
    return {name: (folder / name).read_bytes() if (folder / name).is_file() else None for name in os.listdir(folder)}


def test_dst_or_clip_out_naming_an_input_is_refused_and_nothing_is_written(tmp_path, checkpoint, capsys):
    os.link(checkpoint, tmp_path / 'hard_link.pth')
    os.symlink(checkpoint, tmp_path / 'sym_link.pth')
    (tmp_path / 'sub').mkdir()
    before = _listing(tmp_path)
    src = str(checkpoint)
    cases = [
        ([src, src], 'is the same file as SRC'),
        ([src, str(tmp_path / 'sub' / '..' / 'published.pth')], 'is the same file as SRC'),
        ([src, str(tmp_path / 'hard_link.pth')], 'is the same file as SRC'),
        ([src, str(tmp_path / 'sym_link.pth')], 'is the same file as SRC'),
        ([str(tmp_path / 'sym_link.pth'), src], 'is the same file as SRC'),
        ([src, str(tmp_path / 'out.pth'), '--clip-out', str(tmp_path / 'out.pth')], 'is the same file as DST'),
        ([src, str(tmp_path / 'out.pth'), '--clip-out', str(tmp_path / 'sub' / '..' / 'out.pth')],
         'is the same file as DST'),
        ([src, str(tmp_path / 'out.pth'), '--clip-out', src], '--clip-out'),
        ([src, str(tmp_path / 'out.pth'), '--clip-out', str(tmp_path / 'hard_link.pth')], 'is the same file as SRC'),
    ]
    for args, message in cases:
        assert convert_mod.main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and 'vlunet-convert: nothing written' in err, (args, err)
        assert _listing(tmp_path) == before, args  # SRC unchanged, no DST, no temporary file
    # a different DST still converts
    assert convert_mod.main([src, str(tmp_path / 'out.pth')]) == 0
    assert sorted(torch.load(tmp_path / 'out.pth', weights_only=True)) == ['params']
    assert _listing(tmp_path)['published.pth'] == before['published.pth']


def test_the_command_line_refuses_f_f(tmp_path, checkpoint):
    from conftest import run_cli
    data = checkpoint.read_bytes()
    proc = run_cli(['-m', 'vlunet.convert', str(checkpoint), str(checkpoint)], tmp_path)
    assert proc.returncode == 1 and 'is the same file as SRC' in proc.stderr and 'Traceback' not in proc.stderr
    assert checkpoint.read_bytes() == data and sorted(os.listdir(tmp_path)) == ['published.pth']
