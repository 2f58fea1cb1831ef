"""What `vlunet-train` and `vlunet-test` share: BasicSR's own argument list, checked up front."""
import argparse
import os
import sys


def check_option_file(argv):
    """Exit with a one-line error when ``-opt`` is missing or names no readable file.

    BasicSR would otherwise fail deep inside with a traceback. Arguments are BasicSR's own:
    ``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--local_rank``, ``--force_yml``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    known, _ = parser.parse_known_args(argv)
    if known.opt is None:
        return  # let BasicSR print its usage message
    if not os.path.isfile(known.opt):
        sys.stderr.write(f'error: option file not found: {known.opt!r} '
                         f'(expected a YAML file; working directory: {os.getcwd()})\n')
        raise SystemExit(2)


def run_pipeline(pipeline_name, argv=None):
    """Run ``basicsr.{train,test}.{pipeline_name}`` with experiments/ and results/ under the cwd."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_option_file(argv)
    import vlunet  # noqa: F401  (compat fixes + registries)
    sys.argv[1:] = argv
    if pipeline_name == 'train_pipeline':
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline
    pipeline(os.getcwd())
