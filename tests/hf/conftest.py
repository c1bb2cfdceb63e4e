"""transformers' own common tests (`make test-hf`): the package `transformers_tests` that
scripts/transformers_tests.py builds from the installed release's sdist goes on `sys.path` here.
Without it (plain `make test`), the module is skipped with how to get it."""

from __future__ import annotations

import os
import sys

FOLDER = os.environ.get("MGLLAVA_TRANSFORMERS_TESTS")
if FOLDER and FOLDER not in sys.path:
    sys.path.insert(0, FOLDER)
