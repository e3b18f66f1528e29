"""``python -m lens_cache`` == ``lens-cache``."""

from lens_cache.cli import app

app(prog_name="lens-cache")
