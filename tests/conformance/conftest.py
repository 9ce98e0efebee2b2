"""Expose plugins/*.py to condkit's registry through the `condkit.conditioners` entry-point group.

A throw-away distribution (a .dist-info folder with entry_points.txt) on sys.path names every module
in plugins/, exactly as an installed third-party package would: dropping a new conditioner file into
plugins/ is the only step needed for the conformance suite to test it.
"""

import sys
import tempfile
from pathlib import Path

from condkit.conditioning.registry import ENTRY_POINT_GROUP, rediscover

PLUGINS = Path(__file__).parent / "plugins"


def _install_plugin_distribution() -> None:
    site = Path(tempfile.mkdtemp(prefix="condkit-plugins-"))
    dist_info = site / "condkit_test_plugins-0.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: condkit-test-plugins\nVersion: 0.0\n")
    entries = "".join(f"{module.stem} = {module.stem}\n" for module in sorted(PLUGINS.glob("*.py")))
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entries}")
    sys.path[:0] = [str(site), str(PLUGINS)]
    rediscover()


_install_plugin_distribution()
