"""No-op: its entry in ``_config.yml`` only puts ``book/_ext`` on ``sys.path`` when the config
is a copy written into ``_build/`` (``scripts/strict_config.py``), so that ``book_site`` imports."""


def setup(app):
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
