#!/usr/bin/env python
"""``vlunet-prepare`` (vlunet/data/prepare.py) under its former name: the same options, layouts and outputs."""
import sys

from vlunet.data.prepare import main

if __name__ == '__main__':
    sys.exit(main())
