"""Build script. The compiled extension llmcore._native is added by the native-kernels work;
until then this installs the pure-Python package."""
from setuptools import setup

setup()
