"""contrib/ as the package data of imr.contrib (units, ModSecurity files, the sample config).

pyproject.toml cannot map a directory outside imr/ to a subpackage, so this lists the
packages; setuptools reads everything else from pyproject.toml. Each folder of contrib/ is a
data-only package, which keeps setuptools from warning about unlisted folders.
"""

from pathlib import Path

from setuptools import find_packages, setup

contrib = ["imr.contrib"] + [
    f"imr.contrib.{folder.name}" for folder in sorted(Path("contrib").iterdir()) if folder.is_dir()
]
setup(
    packages=[*find_packages(include=["imr", "imr.*"]), *contrib],
    package_dir={
        name: name.replace("imr.contrib", "contrib", 1).replace(".", "/") for name in contrib
    },
    # "**/*": folders below the first level (contrib/fail2ban/action.d) are data, not
    # packages: a dot in "action.d" cannot be part of a package name.
    package_data={name: ["*", "**/*"] for name in contrib},
)
