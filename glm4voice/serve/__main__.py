"""``python -m glm4voice.serve``: see :mod:`glm4voice.serve.cli`."""

import sys

from glm4voice.serve.cli import main

sys.exit(main())
