#!/usr/bin/env python
"""sparsebench entry point: ``python run_all.py --help`` explains everything."""
import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
