"""``python -m lorakit.cli ...`` (e.g. under torchrun): the ``lorakit`` command."""

import sys

from . import main

sys.exit(main())
