"""``python -m lens_train.reproduction``: the tables' command line (:func:`.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
