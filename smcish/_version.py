"""smcish's version, written here only: pyproject.toml reads it ([tool.setuptools.dynamic]) and
``smcish.__version__`` re-exports it."""

__version__ = "0.1.0"
