"""``python -m mmgrad``: the ``mmgrad`` command (``compare``, ``train``)."""

import sys

from mmgrad.recipes.cli import main

sys.exit(main())
