"""``python -m danbooru_assets``: the ``danbooru-assets`` command line."""

import sys

from danbooru_assets.cli import main

sys.exit(main())
