"""The README's two set-up commands are the ones CI runs, and the documented names exist."""
import os
import re

from conftest import REPO


def _bash_blocks(path):
    with open(path) as f:
        return re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)


def test_ci_runs_the_readme_commands_verbatim():
    quick_start = [b.strip() for b in _bash_blocks(os.path.join(REPO, 'README.md'))[:2]]
    with open(os.path.join(REPO, '.ci', 'run')) as f:
        ci_lines = [line.strip() for line in f]
    for command in quick_start:
        assert command in ci_lines, f'.ci/run does not run the README command: {command}'


def test_versions_agree():
    from vlunet.version import __version__
    with open(os.path.join(REPO, 'setup.py')) as f:
        assert f"VERSION = '{__version__}'" in f.read()


def _readme():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        return f.read()


def test_the_registry_table_lists_every_registered_name():
    import vlunet  # noqa: F401
    from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                        MODEL_REGISTRY)
    table = _readme().split('## What is registered')[1].split('\n## ')[0]
    for registry in (ARCH_REGISTRY, MODEL_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, DATASET_REGISTRY):
        ours = [name for name, obj in registry if getattr(obj, '__module__', '').startswith('vlunet.')]
        row = next(line for line in table.splitlines() if line.startswith(f'| `{registry._name.upper()}_REGISTRY`'))
        listed = set(re.findall(r'`(\w+)`', row.split('|')[2]))
        assert set(ours) <= listed, f'{registry._name}: not in the README table: {sorted(set(ours) - listed)}'


def test_the_methods_table_names_every_method_card_and_release():
    from vlunet.archs.card import list_methods
    table = _readme().split('## Methods: one card each')[1].split('\n## ')[0]
    for card in list_methods():
        assert f'`{card.arch}`' in table, card.arch
        for variant in card.variants:
            if variant.options:
                assert f'`{variant.options}`' in table, variant.options
