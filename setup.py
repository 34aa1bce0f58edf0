"""Build script. The package is pure Python; compiled parts (csrc/) are optional and added by _extensions()."""

from setuptools import setup


def _extensions():
    return {}


setup(**_extensions())
