"""Write _build/strict_config.yml: the book's config with execution off.

The test run executes every chapter under nbval first; the strict build that follows
renders the committed outputs instead of executing everything a second time.
"""

from pathlib import Path

import yaml

root = Path(__file__).resolve().parent.parent
config = yaml.safe_load((root / "_config.yml").read_text())
config["execute"]["execute_notebooks"] = "off"
out = root / "_build" / "strict_config.yml"
out.parent.mkdir(exist_ok=True)
out.write_text(yaml.safe_dump(config, sort_keys=False))
print(out)
