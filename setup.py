"""Package discovery for the folder-to-package mapping in pyproject.toml's ``package-dir``.

setuptools' own discovery looks under one root; quanta maps several folders under ``quanta``,
so this walks each mapped folder and lists every package in it (a folder with ``__init__.py``).
"""

import os

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from setuptools import setup


def _packages():
    with open("pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            if "__init__.py" not in files:
                dirs[:] = []  # a folder that is not a package holds none
                continue
            rel = os.path.relpath(root, folder)
            found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(packages=_packages())
