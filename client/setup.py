"""Only here to ship hubd_client.pth into site-packages (pyproject.toml holds everything else).

The .pth line is a no-op unless HUBD_TFHUB=1; then it adds an import hook that plugs hubd into
tensorflow_hub when (and if) the program imports it. setuptools has no declarative way to install a .pth.
Both a wheel (`pip install ./client`) and an editable install (`pip install -e ./client`) get it: an editable
wheel is built by `editable_wheel`, which never runs build_py's copy, so that command puts the file into the
wheel too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).parent / "hubd_client.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / "hubd_client.pth"))


class EditableWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir: str, pth_prefix: str) -> None:
        # Everything in installation_dir is written into the editable wheel, at the top of site-packages.
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(PTH, Path(installation_dir) / "hubd_client.pth")


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})
