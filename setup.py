# setup.py exists only to declare the C extension; all metadata lives in pyproject.toml.
import os

from setuptools import Extension, setup

extra = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
if os.environ.get("BANGER_DEBUG_BUILD") == "1":
    extra = ["-O0", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]

setup(
    ext_modules=[
        Extension(
            "banger.uffd._uffd",
            sources=["banger/uffd/_uffd.c"],
            extra_compile_args=extra,
            extra_link_args=["-fsanitize=address,undefined"] if os.environ.get("BANGER_DEBUG_BUILD") == "1" else [],
        )
    ]
)
