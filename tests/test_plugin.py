"""The twistd plugin and the packaging."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from conftest import REPO
from procs import build_wheel


def test_getplugins_finds_connmix() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "connmix" in makers
    assert makers["connmix"].module == "connmix_tx.tap"


def test_tap_options_roles() -> None:
    from twisted.python import usage

    from connmix_tx.tap import Options

    for args, role in ((["--dev"], "dev"), (["--role", "single"], "single"), (["--role", "dev"], "dev")):
        options = Options()
        options.parseOptions(args)
        assert options["role"] == role
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--role", "mars"])
    with pytest.raises(usage.UsageError):
        Options().parseOptions([])


def test_tap_builds_the_tree_of_each_role() -> None:
    from twisted.internet.task import Clock

    from connmix_tx.config import default_config
    from connmix_tx.service import ConnmixService

    config = default_config(cwd=str(REPO))
    children = {
        role: sorted(s.name for s in ConnmixService(config, role, Clock(), lambda *a: None))
        for role in ("center", "engine", "dev", "single")
    }
    assert children == {
        "center": ["center"], "engine": ["engine"], "dev": ["center", "engine"], "single": ["center", "engine"],
    }


def test_wheel_carries_home_and_plugin_without_twisted_init(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, REPO)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/connmix_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names and "twisted/__init__.py" not in names
    assert "connmix_tx/_home/etc/connmix.yaml" in names
    assert "connmix_tx/_home/lua/entry.websocket.lua" in names
    assert "connmix_tx/lua/bootstrap.lua" in names
    assert "connmix_tx/console/index.html" in names  # the debug console page (GET /console)
