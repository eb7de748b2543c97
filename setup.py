"""Build script: pure Python everywhere; the optional CUDA extension is added where it can build."""
from setuptools import setup

setup()
