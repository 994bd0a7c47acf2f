"""marginwatch: classifier serving with a per-request brittleness flag (margin consistency).

The one import namespace the distribution installs. Its subpackages live in the repository's
top-level folders (`service/`, `calibration/`, `models/`, `artifact/`), linked here so that the
package, the editable install, mypy and pytest all see one tree: see docs/architecture.md.
"""

__version__ = "0.1.0"
