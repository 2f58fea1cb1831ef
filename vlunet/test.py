"""``vlunet-test -opt OPTIONS.yml``: BasicSR's test pipeline with vlunet's registries loaded.

Results go to ``results/<name>/`` under the current working directory; models of this package
also write ``results/<name>/metrics.json`` there.
"""
from vlunet.cli_common import run_pipeline


def main(argv=None):
    run_pipeline('test_pipeline', argv)


if __name__ == '__main__':
    main()
