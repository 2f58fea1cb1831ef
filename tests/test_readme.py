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
