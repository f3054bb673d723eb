"""``python -m adapterhub.registry VERB ...``: the registry CLI without the rest of adapterhub."""

import sys

from .cli import main

sys.exit(main())
