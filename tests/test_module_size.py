"""Rooms of a readable size: no module of ``connmix_tx/`` grows past ``LIMIT`` lines.

The house aims at modules of about 100-500 lines, each a room one can hold in one's head
(the house style: small, typed, documented modules); ``LIMIT`` leaves a margin above that aim.  A
module that outgrows it is split along its seams (as ``config/`` and ``lua/php_pack.py`` were), not
trimmed by squeezing lines.
"""

from __future__ import annotations

from pathlib import Path


import connmix_tx

LIMIT = 600
PACKAGE = Path(connmix_tx.__file__).resolve().parent


def line_count(path: Path) -> int:
    """The lines of a source file, as an editor numbers them."""
    return len(path.read_text(encoding="utf-8").splitlines())


def oversized(root: Path, limit: int = LIMIT) -> list[str]:
    """``"<path relative to root>: <lines>"`` for every Python module under ``root`` longer than
    ``limit`` lines, longest first."""
    sizes = [(line_count(path), path.relative_to(root).as_posix()) for path in sorted(root.rglob("*.py"))]
    return [f"{name}: {lines}" for lines, name in sorted(sizes, key=lambda item: (-item[0], item[1]))
            if lines > limit]


def test_the_measure_finds_long_modules_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "short.py").write_text("x = 1\n" * 600)
    (tmp_path / "long.py").write_text("x = 1\n" * 601)
    (tmp_path / "deep" / "er" / "longer.py").write_text("x = 1\n" * 900)
    (tmp_path / "deep" / "notes.txt").write_text("line\n" * 5000)
    assert oversized(tmp_path) == ["deep/er/longer.py: 900", "long.py: 601"]
    assert oversized(tmp_path, limit=1000) == []


def test_the_measure_looks_at_the_package() -> None:
    counted = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    assert {"config/schema.py", "lua/stdlib.py", "pb.py", "service.py"} <= counted


def test_no_module_is_over_the_limit() -> None:
    offenders = oversized(PACKAGE)
    assert not offenders, f"modules of connmix_tx/ over {LIMIT} lines (split them along their seams):\n" + \
        "\n".join(offenders)
