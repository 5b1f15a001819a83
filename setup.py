"""Packaging for connmix-tx.

The repository root holds ``lua/`` and ``etc/`` (the *home directory*, docs/configuration.md).  An
editable install puts the repository root on ``sys.path`` through a static ``.pth`` file (the layout
is "simple", so setuptools does not use an import hook that Twisted's plugin scan cannot see); a
regular install copies both folders into ``connmix_tx/_home`` so the installed package carries its
default configuration and scripts.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HOME_FOLDERS = ("etc", "lua")


class BuildWithHome(build_py):
    """Copy the home folders (etc/, lua/) into the built package as ``connmix_tx/_home``."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "connmix_tx", "_home")
        for folder in HOME_FOLDERS:
            dest = os.path.join(target, folder)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))


def read_version() -> str:
    scope: dict = {}
    with open(os.path.join("connmix_tx", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


setup(
    name="connmix-tx",
    version=read_version(),
    description="Distributed WebSocket long-connection engine scripted in Lua, on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "."},
    packages=[
        "connmix_tx",
        "connmix_tx.center",
        "connmix_tx.client",
        "connmix_tx.config",
        "connmix_tx.console",
        "connmix_tx.engine",
        "connmix_tx.lua",
        "connmix_tx.parts",
        "connmix_tx.testing",
        # No __init__.py here: Twisted's plugin package collects this folder from every
        # sys.path entry; shipping an __init__.py would overwrite Twisted's own.
        "twisted.plugins",
    ],
    package_data={"connmix_tx.lua": ["*.lua"], "connmix_tx.console": ["*.html"]},
    cmdclass={"build_py": BuildWithHome},
    entry_points={"console_scripts": ["connmix-cli = connmix_tx.cli:main"]},
    install_requires=[
        "Twisted>=24.3",
        "autobahn>=24.4",
        "lupa>=2.2",
        "PyYAML>=6.0",
        "msgpack>=1.0",
        "prometheus_client>=0.17",
        "pyOpenSSL>=24.0",
        "service-identity>=24.1",
        "treq>=23.11",  # mix.http.request
        "hiredis>=2.0",  # RESP parsing (mix.redis, the redis queue backend)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "websockets>=13",
            "wheel",  # the packaging test builds a wheel without build isolation
            "selenium>=4.11",  # drives Debian's chromium + chromedriver for the debug console test
            # the bench smoke test runs the load generator
            "picows>=1.9",
            "uvloop>=0.19",
            # static types of connmix_tx/ (mypy.ini; `make typecheck`, a step of .ci/run)
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "types-PyYAML",
        ],
        # bench/: the load generator (picows on uvloop) and the profiler of docs/performance.md.
        "bench": [
            "picows>=1.9",
            "uvloop>=0.19",
            "py-spy>=0.3",
        ],
    },
    zip_safe=False,
)
