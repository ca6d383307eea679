"""dynloss is not installed: it runs in place (flat top-level modules such as ``models`` that
must not land in site-packages). This file only makes ``pip install .`` say so."""

import sys

sys.exit(
    "dynloss runs in place and is not installed: python -m pip install -r requirements.txt, "
    "then run the scripts from the repository (README.md)"
)
