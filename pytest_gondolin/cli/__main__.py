"""``python -m pytest_gondolin.cli``: the ``gondolin`` command."""

from __future__ import annotations

import sys

from pytest_gondolin.cli import main

sys.exit(main())
