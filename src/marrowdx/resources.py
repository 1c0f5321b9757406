"""Where the data files marrowdx ships next to its code live: the model-repository sources
(``config.pbtxt`` files, ``model.py``, ``dali.py``) and the locustfile.

Why a lookup and not a path next to the checkout: the engine-build image installs the wheel,
with no checkout around it. The files stay in git where a reader expects them (top-level
``model_repository/`` and ``loadtests/``); ``pyproject.toml`` maps those folders to the
packages ``marrowdx.model_repository`` and ``marrowdx.loadtests``, so the wheel carries them
as package data and an editable install resolves them to the checkout's folders. They are
found with ``find_spec``, never imported: an import would write a ``__pycache__`` folder into
``model_repository/``, which Triton would take for a model.

Standard library only: the thin client and the deploy scripts import nothing heavy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from marrowdx.errors import RepositoryError

#: Package holding the hand-written Triton model sources (git: ``model_repository/``).
MODEL_REPOSITORY_PACKAGE = "marrowdx.model_repository"
#: Package holding the locust load test (git: ``loadtests/``).
LOADTESTS_PACKAGE = "marrowdx.loadtests"
#: The locust entry file inside LOADTESTS_PACKAGE.
LOCUSTFILE = "locustfile.py"


def package_folder(package: str) -> Path:
    """The folder a data package resolves to (the wheel's copy, or the checkout's folder in
    an editable install); RepositoryError naming the package when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    folders = [Path(p) for p in locations if Path(p).is_dir()]
    if not folders:
        raise RepositoryError(
            f"the package data {package} is not installed: reinstall marrowdx "
            "(pip install marrowdx, or `make setup` in a checkout)"
        )
    return folders[0]


def model_repository_sources() -> Path:
    """The hand-written model repository: per model ``config.pbtxt``, ``configs/gpu.pbtxt``
    and the version folder's ``model.py`` / ``dali.py``."""
    return package_folder(MODEL_REPOSITORY_PACKAGE)


def locustfile() -> Path:
    """The locustfile ``marrowdx.bench.loadtest`` hands to locust."""
    path = package_folder(LOADTESTS_PACKAGE) / LOCUSTFILE
    if not path.is_file():
        raise RepositoryError(f"{path} is missing from the installed marrowdx package")
    return path
