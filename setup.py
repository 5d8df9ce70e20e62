"""Build hvdsgd: setuptools drives CMake to compile the pybind11 extension ``hvdsgd._C``,
and ships ``scripts/build_horovod.sh`` inside the package as ``hvdsgd/build_horovod.sh`` (run by
``python -m hvdsgd.build_horovod``).

    pip install .                           # torch, torchvision pinned in pyproject.toml
    pip install --no-build-isolation .      # into an environment with torch (and Horovod)
    HVDSGD_NATIVE=1 pip install ...         # -march=native kernels; CMAKE_ARGS is honoured
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "hvdsgd/__init__.py").read_text())[1]


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if int(os.environ.get("DEBUG", 0)) else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DHVDSGD_VERSION={VERSION}",
            f"-DHVDSGD_NATIVE={'ON' if os.environ.get('HVDSGD_NATIVE') == '1' else 'OFF'}",
        ]
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split(" ") if a]
        build = Path(self.build_temp) / ext.name
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build, check=True)
        subprocess.run(
            ["cmake", "--build", ".", "-j", str(os.cpu_count() or 1)], cwd=build, check=True
        )


class BuildPy(build_py):
    """Copy scripts/build_horovod.sh into the built package as hvdsgd/build_horovod.sh. An
    editable install skips it: its hvdsgd.build_horovod runs scripts/build_horovod.sh itself."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(
                str(ROOT / "scripts" / "build_horovod.sh"),
                str(Path(self.build_lib) / "hvdsgd" / "build_horovod.sh"),
            )


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("hvdsgd._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
)
