"""Published results as data: every card's rows name real tasks of their setting and a source; averages are
recomputed from the per-task values and a printed one that is off is flagged; other papers' quotes are kept
beside the method's own numbers."""
import os

import pytest
import yaml

from conftest import REPO
from vlunet.archs.card import PublishedResults, get_card, list_methods
from vlunet.leaderboard import published_for, published_tasks, recompute, setting_tasks

OPTIONS = os.path.join(REPO, 'options', 'test')
ROWS = [(card, r) for card in list_methods() for r in card.results]


def _val_sets(setting):
    names = set()
    for name in os.listdir(OPTIONS):
        if name.endswith(f'_{setting}.yml'):
            with open(os.path.join(OPTIONS, name)) as f:
                datasets = yaml.safe_load(f)['datasets']
            names |= {d['name'] for d in datasets.values()}
    return names


@pytest.mark.parametrize('card,row', ROWS, ids=[f'{c.arch}-{r.setting}-{i}' for i, (c, r) in enumerate(ROWS)])
def test_every_row_names_its_setting_tasks_and_source(card, row):
    assert set(row.tasks) <= _val_sets(row.setting), f'{card.name} {row.setting}: tasks {set(row.tasks)}'
    assert row.source and card.variant(row.variant)
    for psnr, ssim in row.tasks.values():
        assert 10 < psnr < 50 and (ssim is None or 0 < ssim < 1)
    assert row.tasks or row.average   # an average alone is allowed (said so in the source)
    if not row.tasks:
        assert 'not printed anywhere read here' in row.source


def test_recomputed_average_and_flag():
    exact = recompute(PublishedResults('NHR', 'x', {'a': (30.0, 0.9), 'b': (31.0, 0.8)}, 's', average=(30.5, 0.85)))
    assert exact.recomputed == pytest.approx((30.5, 0.85)) and exact.flags == []
    # within rounding (0.01 dB / 0.001): not flagged; beyond: flagged with both numbers
    near = recompute(PublishedResults('NHR', 'x', {'a': (30.0, 0.9), 'b': (31.01, 0.8)}, 's', average=(30.5, 0.85)))
    assert near.flags == []
    off = recompute(PublishedResults('NHR', 'x', {'a': (30.0, 0.9), 'b': (31.04, 0.81)}, 's', average=(30.5, 0.85)))
    assert len(off.flags) == 2 and '30.520' in off.flags[0] and '-0.020 dB' in off.flags[0]
    assert '0.8550' in off.flags[1]
    alone = recompute(PublishedResults('CDD11', 'x', {}, 's', average=(29.0, 0.88)))
    assert alone.recomputed == (None, None) and alone.best_average == (29.0, 0.88)


def test_the_quotes_that_disagree_are_there_with_their_sources():
    promptir = published_for(get_card('PromptIR'), 'NHRBL')
    averages = {p.printed[0]: p.results for p in promptir}
    assert set(averages) == {29.15, 29.72}   # one table prints 29.15, another 29.72
    assert all(r.quoted_in for r in averages.values()) and 'figures/5task.png' in averages[29.15].source
    assert 'figs/5Dquant.png' in averages[29.72].source
    moce = [p for p in published_for(get_card('MoCE-IR'), 'NHRBL', 'MoCE-IR') if p.printed[0] == 30.25]
    assert len(moce) == 1 and moce[0].recomputed[0] == pytest.approx(30.582) and moce[0].flags
    own = published_for(get_card('MoCE-IR'), 'NHRBL', 'MoCE-IR')[0]
    assert own.own and own.flags == [] and own.results.tasks == moce[0].results.tasks


def test_settings_and_their_published_tasks():
    assert published_tasks('NHRBL') == ['SOTS_outdoor', 'Rain100L', 'CBSD68_sigma25', 'GoPro', 'LOL']
    assert len(published_tasks('NHR')) == 5 and len(published_tasks('CDD11')) == 11
    assert setting_tasks('NHR', OPTIONS)[:3] == ['CBSD68_sigma15', 'CBSD68_sigma25', 'CBSD68_sigma50']
    cdd = [p for card in list_methods() for p in published_for(card, 'CDD11')]
    assert {p.results.variant for p in cdd} >= {'Restormer', 'DGUNet', 'PromptIR', 'MoCE-IR-S', 'MIRAGE-S'}
    onerestore = [p for p in cdd if p.results.quoted_in == 'OneRestore (ECCV 2024)']
    assert len(onerestore) == 3 and all(p.results.measurement == {'psnr': 'uint8', 'ssim': 'uint8_uniform7'}
                                        for p in onerestore)
    assert all(p.flags == [] for p in onerestore)   # their printed averages are the means of the 11 types
