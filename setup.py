"""Build shim: the metadata and the package list are in pyproject.toml.

It stays for pip's legacy editable install (``setup.py develop``), which pip falls back to when
the environment's setuptools is older than 64 and has no PEP 660 editable hook.
"""
from setuptools import setup

setup()
