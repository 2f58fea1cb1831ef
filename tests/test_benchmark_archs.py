"""scripts/benchmark_archs.py reads the method cards: every method is benchmarked without naming it."""
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import benchmark_archs  # noqa: E402

from vlunet.archs.card import list_methods  # noqa: E402  (benchmark_archs imported vlunet first)


def test_default_selection_covers_every_method_card():
    chosen = {benchmark_archs.network_opt(name)[0].arch for name in benchmark_archs.default_selection()}
    assert chosen == {card.arch for card in list_methods()}


@pytest.mark.parametrize('card', list_methods()[:1] + [c for c in list_methods() if c.condition][:1],
                         ids=lambda c: c.arch)
def test_tiny_measurement_in_process(card):
    for what in ('forward', 'train'):
        row = benchmark_archs.measure(card.variants[0].name, what, 'cpu', threads=1, repeats=1, tiny=True)
        assert row['arch'] == card.variants[0].name
        assert (row['forward_s'] if what == 'forward' else row['train_step_s']) > 0


def test_unknown_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark_archs.main(['--archs', 'NoSuchMethod', '--tiny'])
    assert 'NoSuchMethod' in capsys.readouterr().err


def test_a_measurement_killed_by_a_signal_says_so(tmp_path):
    """A child killed by the kernel (the out-of-memory killer sends SIGKILL) leaves no traceback: the
    error's last line, which the benchmarks' tables quote, names the signal."""
    script = tmp_path / 'child.py'
    script.write_text('import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n')
    with pytest.raises(RuntimeError) as caught:
        benchmark_archs._subprocess({'what': 'nothing'}, script=str(script), timeout=60)
    assert str(caught.value).strip().splitlines()[-1] == 'killed by SIGKILL (the out-of-memory killer?)'
