"""Build of the optional C loops (`nbdcache/tier/_pages.c`); metadata is in pyproject.toml.

The extension needs a C compiler and lz4's headers (Debian: gcc, liblz4-dev).
Without them the build goes on and nbdcache runs its pure-Python loops.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nbdcache.tier._pages",
            ["nbdcache/tier/_pages.c"],
            libraries=["lz4"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
