"""Locate the Triton 2.51 server shipped inside the ``nvidia-pytriton`` wheel and make it runnable.

The wheel carries ``pytriton/tritonserver/{bin,backends,caches}`` plus one python-backend
stub per Python version, but the stub must sit *inside* ``backends/python/`` for Triton to
find it, and the site-packages tree may be read-only. So, as PyTriton itself does
(``pytriton/triton.py``), we copy the tree once into a cache folder under the work dir and
put the stub for the running interpreter in place. We do not use PyTriton's Python API: we
run the plain ``tritonserver`` binary on our own model repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from marrowdx.errors import TritonNotInstalled

#: The distribution that ships the server binary.
TRITON_DISTRIBUTION = "nvidia-pytriton"
#: Written last into the cache folder; its content says which wheel/Python the copy is for.
_MARKER = "marrowdx-install.json"


@dataclass(frozen=True)
class TritonInstall:
    root: Path  # the copied tree: bin/, backends/, caches/
    libs_path: Path  # site-packages/nvidia_pytriton.libs (vendored shared libraries)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backend_directory(self) -> Path:
        return self.root / "backends"

    @property
    def cache_directory(self) -> Path:
        return self.root / "caches"

    def environment(
        self, base: dict[str, str] | None = None, extra_pythonpath: list[Path] = ()
    ) -> dict[str, str]:
        """Environment for the server and the python-backend stubs it spawns.

        The stub links ``libpython3.X.so``: the running interpreter's LIBDIR goes first so the
        stub embeds the same Python build as the venv (not a system one). PYTHONPATH carries
        the venv's site-packages and the project sources so ``model.py`` files can import
        ``marrowdx`` and its dependencies.
        """
        env = dict(os.environ if base is None else base)
        lib_dirs = [str(self.libs_path)]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and Path(libdir, str(sysconfig.get_config_var("INSTSONAME") or "")).exists():
            lib_dirs.insert(0, libdir)
        if env.get("LD_LIBRARY_PATH"):
            lib_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
        paths = [str(p) for p in extra_pythonpath] + python_import_paths()
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        # The stub finds numpy etc. through PYTHONPATH; keep user site dirs out of it.
        env["PYTHONNOUSERSITE"] = "1"
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def python_import_paths() -> list[str]:
    """Folders the stub needs on sys.path: the venv's site-packages and, for an editable
    install, the folders holding the ``marrowdx`` sources (found from the imported package)."""
    import marrowdx

    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    # Editable installs resolve packages through a finder hook that the embedded stub
    # interpreter does not run (.pth files in PYTHONPATH folders are not processed), so
    # add the parent of the real package folder explicitly.
    paths.insert(0, str(Path(marrowdx.__file__).resolve().parent.parent))
    return list(dict.fromkeys(paths))


def _pytriton_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(TRITON_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise TritonNotInstalled(
            f"{TRITON_DISTRIBUTION} is not installed: "
            "`pip install marrowdx[server]` (or `make setup`)"
        ) from exc
    root = Path(str(dist.locate_file("pytriton")))
    if not (root / "tritonserver" / "bin" / "tritonserver").exists():
        raise TritonNotInstalled(f"no tritonserver binary under {root}/tritonserver/bin")
    return root


def ensure_installed(cache_dir: Path) -> TritonInstall:
    """Copy the server tree into ``cache_dir`` once (per wheel version and Python version).

    A second call with nothing changed only reads the marker. The copy is made in a
    temporary sibling folder and renamed, so an interrupted copy never looks complete.
    """
    pytriton_dir = _pytriton_dir()
    libs_path = pytriton_dir.parent / "nvidia_pytriton.libs"
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = (
        pytriton_dir
        / "tritonserver"
        / "python_backend_stubs"
        / py_version
        / "triton_python_backend_stub"
    )
    if not stub.exists():
        raise TritonNotInstalled(
            f"{TRITON_DISTRIBUTION} ships no python-backend stub for Python {py_version}"
        )
    wanted = {
        "version": importlib.metadata.version(TRITON_DISTRIBUTION),
        "python": py_version,
        "source": str(pytriton_dir),
    }
    root = Path(cache_dir) / f"tritonserver-{wanted['version']}-py{py_version}"
    marker = root / _MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return TritonInstall(root=root, libs_path=libs_path)
        except (OSError, json.JSONDecodeError):
            pass
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        pytriton_dir / "tritonserver",
        tmp,
        ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"),
    )
    shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
    (tmp / _MARKER).write_text(json.dumps(wanted))
    shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:  # another process finished the same copy first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.exists():
            raise
    return TritonInstall(root=root, libs_path=libs_path)
