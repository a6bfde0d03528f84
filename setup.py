"""Only here to ship hubd_client.pth into site-packages (pyproject.toml holds everything else).

The .pth line is a no-op unless HUBD_TFHUB=1; then it adds an import hook that plugs hubd into
tensorflow_hub when (and if) the program imports it. setuptools has no declarative way to install a .pth.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(
            str(Path(__file__).parent / "hubd_client.pth"), str(Path(self.build_lib) / "hubd_client.pth")
        )


setup(cmdclass={"build_py": BuildWithPth})
