"""vlunet's policies for BasicSR's pipelines (vlunet/pipeline.py; resuming: tests/test_resume.py)."""
import pytest

import vlunet  # noqa: F401
from vlunet import pipeline


def test_flags_under_path_are_not_made_into_folders(tmp_path):
    from basicsr.utils import misc

    from vlunet import pipeline
    pipeline.install_flags_under_path()
    root = tmp_path / 'exp'
    opt = {'is_train': True, 'path': {'experiments_root': str(root), 'models': str(root / 'models'),
                                      'widen_degradation_types': True, 'pretrain_network_g': None}}
    misc.make_exp_dirs(opt)  # raised TypeError on the boolean before the fix
    assert (root / 'models').is_dir()
    assert opt['path']['widen_degradation_types'] is True  # the caller's options are untouched


def test_force_yml_values_that_are_numbers_are_numbers():
    from basicsr.utils import options
    original = options._postprocess_yml_value
    assert pipeline.parse_force_yml_value('1e10', original) == 1e10
    assert pipeline.parse_force_yml_value('-1', original) == -1 and isinstance(
        pipeline.parse_force_yml_value('-1', original), int)
    assert pipeline.parse_force_yml_value('2e-4', original) == pytest.approx(2e-4)
    assert pipeline.parse_force_yml_value('abc', original) == 'abc'
    assert pipeline.parse_force_yml_value('true', original) is True


def test_compat_installs_no_policy_of_ours():
    """``import vlunet`` alone leaves BasicSR's choices: the policies come with vlunet-train / vlunet-test."""
    import ast
    import inspect

    from vlunet import compat
    tree = ast.parse(inspect.getsource(compat))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not [m for m in imported if m.split('.')[0] == 'vlunet'], imported
