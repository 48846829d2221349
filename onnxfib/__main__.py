"""``python -m onnxfib``: the command line."""

import sys

from onnxfib.cli import main

sys.exit(main())
