"""scripts/make_option_files.py: a method's option files from its card and the shared protocol."""
import os
import shutil
import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'scripts'))
import make_option_files  # noqa: E402

from basicsr.utils.options import ordered_yaml  # noqa: E402  (after vlunet: a safe loader)
from vlunet.archs.card import list_methods  # noqa: E402


def _load(path):
    with open(path) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def test_files_made_from_the_card_equal_the_shipped_ones_but_for_the_network_spelling(tmp_path):
    # a method with its own training term, its files removed from a copy of options/, made again
    card = next(c for c in list_methods() if c.training_terms and c.condition is None
                and len(c.training_terms) == 1 and c.variants[0].options)
    stem = card.variants[0].options
    options = tmp_path / 'options'
    shutil.copytree(os.path.join(REPO, 'options'), options)
    for path in options.glob(f'*/{stem}_*.yml'):
        path.unlink()
    written = make_option_files.make(card.name, card.variants[0].name, options=str(options), log=lambda *_: None)
    assert len(written) == 2 * len(make_option_files.settings(str(options)))
    for path in written:
        made, shipped = _load(path), _load(os.path.join(REPO, 'options', *path.split(os.sep)[-2:]))
        for key in set(made) | set(shipped):
            if key == 'network_g':  # the card's released kwargs; the shipped file spells out the defaults too
                assert {k: shipped[key][k] for k in made[key]} == made[key], path
            elif key == 'train':
                terms = {term.key for term in card.training_terms}  # setting-specific options may differ
                assert {k: v for k, v in made['train'].items() if k not in terms} == \
                    {k: v for k, v in shipped['train'].items() if k not in terms}, path
                for term in card.training_terms:
                    assert made['train'][term.key]['type'] == shipped['train'][term.key]['type']
            else:
                assert made[key] == shipped[key], (path, key)
        with open(path) as f:
            header = f.read().split('\nname:')[0]
        assert card.paper in header and '# Protocol:' in header
    with pytest.raises(SystemExit, match='exists; pass --overwrite'):
        make_option_files.make(card.name, card.variants[0].name, options=str(options), log=lambda *_: None)


@pytest.mark.parametrize('card', list_methods(), ids=lambda c: c.arch)
def test_demo_files_of_every_method_build_its_tiny_network_with_its_terms(tmp_path, card):
    from basicsr.archs import build_network
    train, test = make_option_files.make_demo(card.name, str(tmp_path), log=lambda *_: None)
    train, test = _load(train), _load(test)
    assert train['network_g'] == test['network_g'] and train['network_g']['type'] == card.arch
    build_network(dict(train['network_g']))
    assert {t.key for t in card.training_terms} <= set(train['train'])
    assert train['name'] == test['name'] and test['path']['pretrain_network_g'].startswith(
        f'experiments/{train["name"]}/')
