"""Build hook: ships ``client/healthd_auto.pth`` into site-packages, next to the packages.

Everything else is declared in pyproject.toml. The ``.pth`` line is Python's start-up hook for
auto-attach (``healthd_client.bootstrap``); it does nothing unless HEALTHD_AUTO is set. It goes
through ``data_files`` because setuptools installs those in editable installs too (``pip install -e``),
unlike files placed in the build directory. (setuptools' ``editable_wheel`` asks the distribution for
``has_data()``, which only ``install`` defines, so without ``_Distribution`` below an editable install
skips data files: checked with setuptools 84.) Data files are installed relative to the environment's
prefix, so the destination is site-packages relative to the prefix of the interpreter that builds.
"""

import os
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution

SITE_PACKAGES = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))



class _Distribution(Distribution):
    def has_data(self) -> bool:
        return self.has_data_files()


setup(distclass=_Distribution, data_files=[(SITE_PACKAGES, ["client/healthd_auto.pth"])])
