"""``vlunet-train -opt OPTIONS.yml [--launcher pytorch] [--auto_resume] [--debug] [--force_yml k:v=x]``.

Exactly BasicSR's training entry point with vlunet's registries loaded; experiments/ and
tb_logger/ are created under the current working directory. ``python -m vlunet.train`` and
``torchrun --nproc_per_node=N -m vlunet.train -opt X --launcher pytorch`` work as well.
"""
from vlunet.cli_common import run_pipeline


def main(argv=None):
    run_pipeline('train_pipeline', argv)


if __name__ == '__main__':
    main()
