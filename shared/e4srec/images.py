"""Container image names the components run in (overridden per profile; see images/)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("e4srec")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0"

# No registry host here: the cluster profile prefixes its own registry.
CPU_IMAGE = f"e4srec/e4srec-cpu:{VERSION}"
