# Minimal setup.py: only here so setuptools runs the cffi builder (cffi_modules).
from setuptools import setup

setup(cffi_modules=["smcish/_cffi/build_ring.py:ffibuilder"])
