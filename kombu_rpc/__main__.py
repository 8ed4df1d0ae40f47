"""``python -m kombu_rpc``: the ``kombu-rpc`` command line."""

import sys

from ._cli import main

sys.exit(main())
