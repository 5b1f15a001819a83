"""The reference documents keep up with the code.

* Every key of the configuration schema (the one table in ``connmix_tx.config`` that drives
  validation and reload) is documented in ``docs/configuration.md``, written as a code span with
  list indices as ``[]``: `` `engine.servers[].port` ``.  A key added to the schema without a line
  in the document fails here, and so does a table row whose default or reload column no longer
  matches the schema.
* Every method the API dispatcher serves, in both dialects, and every error code it answers with,
  is documented in ``docs/api.md``.
* Comments and documents cite what a reader of the repository can open: no section number of a
  specification or style guide kept outside it, and every ``docs/<name>.md`` they name exists
  (with the heading a Markdown link points at).

Both lists are read from the code at test time, so keys and methods added later are checked
without touching this file.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import pytest

from conftest import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"
API = REPO / "docs" / "api.md"


# --------------------------------------------------------------------------- the config schema


def _schema_modules() -> Iterator[ModuleType]:
    """``connmix_tx.config`` and, if it became a package, its submodules."""
    package = importlib.import_module("connmix_tx.config")
    yield package
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        yield importlib.import_module(f"{package.__name__}.{info.name}")


def config_schema() -> Any:
    """The schema table: the root mapping node (``_SCHEMA``) of the configuration walker."""
    for module in _schema_modules():
        for name in ("_SCHEMA", "SCHEMA"):
            if hasattr(module, name):
                return getattr(module, name)
    raise AssertionError("no configuration schema table (_SCHEMA) found in connmix_tx.config")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def key_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key path below ``node``: mapping keys (sections included), the keys accepted for
    compatibility, and list items as ``[]``.

    Mapping nodes have ``fields`` (YAML key -> field with a ``node``) and ``unused`` (accepted,
    ignored keys); list nodes have ``item``.
    """
    fields = getattr(node, "fields", None)
    if isinstance(fields, dict):
        for key, field in fields.items():
            path = _join(prefix, key)
            yield path
            yield from key_paths(field.node, path)
        for key in sorted(getattr(node, "unused", ())):
            yield _join(prefix, key)
    item = getattr(node, "item", None)
    if item is not None:
        yield from key_paths(item, prefix + "[]")


def undocumented(paths: Iterable[str], text: str) -> list[str]:
    """The paths that do not appear in ``text`` as a code span of their own."""
    return [path for path in paths if f"`{path}`" not in text]


def test_the_schema_walk_finds_keys_at_every_depth() -> None:
    paths = list(key_paths(config_schema()))
    for expected in ("logging", "logging.level", "access.users[].roles", "engine.servers[].options[].value",
                     "engine.luavm.redis[].addr", "center.registry.tls.certificate",
                     "engine.servers[].readBufferSize", "prometheus.summary.maxAge"):
        assert expected in paths
    assert len(paths) == len(set(paths))


def test_a_key_missing_from_the_document_is_reported() -> None:
    text = "`logging.level` and `engine.servers[].port` and engine.servers[].entry"
    paths = ["logging.level", "engine.servers[].port", "engine.servers[].entry", "engine.servers"]
    assert undocumented(paths, text) == ["engine.servers[].entry", "engine.servers"]


def test_every_configuration_key_is_documented() -> None:
    missing = undocumented(key_paths(config_schema()), CONFIGURATION.read_text(encoding="utf-8"))
    assert not missing, "keys missing from docs/configuration.md: " + ", ".join(missing)


def leaf_fields(node: Any, prefix: str = "", hot: str = "no") -> Iterator[tuple[str, Any, str]]:
    """``(path, default, reload)`` of every key whose default is a plain scalar; ``reload`` is
    the key's own hotness or the one it inherits (``hot``, ``new conns`` or ``no``)."""
    fields = getattr(node, "fields", None)
    if isinstance(fields, dict):
        for key, field in fields.items():
            path, own = _join(prefix, key), field.hot or hot
            if type(field.default) in (str, int, float, bool):
                yield path, field.default, own
            yield from leaf_fields(field.node, path, own)
    item = getattr(node, "item", None)
    if item is not None:
        yield from leaf_fields(item, prefix + "[]", hot)


def table_rows(text: str) -> dict[str, list[str]]:
    """The cells after the key of every table row that starts with a key code span."""
    rows = {}
    for match in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", text, re.M):
        rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


def shown(value: Any) -> str:
    """A default as the document writes it: YAML spelling in a code span."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return '`""`'
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def test_defaults_and_reload_columns_match_the_schema() -> None:
    rows = table_rows(CONFIGURATION.read_text(encoding="utf-8"))
    reload_words = {"hot": "hot", "new conns": "new conns", "no": "restart"}
    wrong = []
    for path, default, hot in leaf_fields(config_schema()):
        cells = rows.get(path)
        if cells is None:
            wrong.append(f"{path}: no table row")
            continue
        _type, doc_default, doc_reload = cells[0], cells[1], cells[2]
        if doc_default not in (shown(default), f'`"{default}"`'):  # YAML may need quotes: "*"
            wrong.append(f"{path}: default {doc_default} in the document, {shown(default)} in the schema")
        if not doc_reload.startswith(reload_words[hot]):
            wrong.append(f"{path}: reload {doc_reload!r} in the document, {reload_words[hot]!r} in the schema")
    assert not wrong, "docs/configuration.md disagrees with the schema:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------- the API


def api_method_names() -> set[str]:
    """Every method name the WebSocket API answers: the dispatcher's methods (long names) and
    the compact names that stand for them (``queue.pop``...)."""
    from connmix_tx.engine import api

    dispatcher = api.ApiDispatcher(None, None)  # type: ignore[arg-type] - only its table is read
    names = set(dispatcher.methods)
    names |= set(getattr(api, "METHOD_ROLES", {}))
    names |= set(getattr(api.CompactForm, "ALIASES", {}))
    return names


def api_error_codes() -> set[int]:
    """The error codes of the API: the code constants of ``connmix_tx.engine.api`` (application
    codes 100-999 and the JSON-RPC range) and the access code of ``connmix_tx.auth``."""
    from connmix_tx import auth
    from connmix_tx.engine import api

    codes = {auth.UNAUTHORIZED}
    for name, value in vars(api).items():
        if name.isupper() and type(value) is int and (100 <= value <= 999 or -32768 <= value <= -32000):
            codes.add(value)
    return codes


def test_the_api_lists_are_read_from_the_code() -> None:
    assert {"server.ping", "queue.consume", "queue.pop", "queue.unpop", "mesh.send"} <= api_method_names()
    assert {101, 201, 202, 203, 301, 401, -32700, -32600, -32601, -32603, -32001} <= api_error_codes()


def test_every_api_method_is_documented() -> None:
    text = API.read_text(encoding="utf-8")
    missing = sorted(name for name in api_method_names() if f"`{name}`" not in text)
    assert not missing, "methods missing from docs/api.md: " + ", ".join(missing)


@pytest.mark.parametrize("code", sorted(api_error_codes()))
def test_every_error_code_has_a_row_and_an_example_reply(code: int) -> None:
    text = API.read_text(encoding="utf-8")
    assert re.search(rf"^\| `{code}` \|", text, re.M), f"no row for error {code} in docs/api.md"
    long_form = f'"code":{code},'
    compact = f'"c":{code},'
    assert long_form in text or compact in text, f"no example reply with error {code} in docs/api.md"


# --------------------------------------------------------------------------- citations

#: Where the repository's own code, scripts and documents live.
CITING = ("connmix_tx", "lua", "bench", "conformance", "tests", "etc", "docs", "README.md")
#: Folders that hold no text of ours.
SKIPPED = {"__pycache__", "images", "node_modules"}

#: A section number of a document that is not in the repository: the word SPEC or STYLE (or
#: SPEC.md) followed by a number, "section" and a number, or a paragraph sign and a number.
OUTSIDE_CITATION = re.compile(r"\b(?:SPEC|STYLE)(?:\.md)?[ ,]*(?:sections? +|§ *)?\d|§ *\d")
#: A path of a document under docs/ as comments and documents write it.
DOCS_PATH = re.compile(r"\bdocs/([A-Za-z0-9_.-]+\.md)")
#: A relative Markdown link to a .md file (or to a heading of the same file), with an optional
#: heading anchor.
MD_LINK = re.compile(r"\]\((?!https?:)([A-Za-z0-9_./-]+\.md)?(?:#([A-Za-z0-9_-]+))?\)")


def repository_texts() -> Iterator[tuple[str, str]]:
    """``(path relative to the repository, text)`` of every text file of ``CITING``."""
    for name in CITING:
        root = REPO / name
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if SKIPPED & set(path.relative_to(REPO).parts):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # binary files (images, compiled files) cite nothing
            yield str(path.relative_to(REPO)), text


def outside_citations(text: str) -> list[str]:
    """The lines of ``text`` that cite a section of a document outside the repository."""
    return [line.strip() for line in text.splitlines() if OUTSIDE_CITATION.search(line)]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_a_section_number_of_an_outside_document_is_reported() -> None:
    spec, style, sign = "SPEC", "STYLE", "\u00a7"  # spelt apart so that this file passes the scan
    bad = [f"({spec} 7.5)", f"see {spec}.md section 3.", f"{spec} {sign}4.1", f"({style} 6)",
           f"the {sign}8.4 wire format"]
    good = ["(docs/api.md, Error codes)", "SPEC_CODES = {1}", "local SPECIAL = 1", "STYLE.md"]
    assert outside_citations("\n".join(bad)) == bad
    assert outside_citations("\n".join(good)) == []


def test_the_heading_anchors_are_githubs() -> None:
    text = "# The Lua API\n## The `mix` library\n```\n# not a heading\n```\n### Keys: `a.b`"
    assert heading_anchors(text) == {"the-lua-api", "the-mix-library", "keys-ab"}


def test_nothing_cites_a_section_of_a_document_outside_the_repository() -> None:
    texts = list(repository_texts())
    scanned = {path.split("/")[0] for path, _text in texts}
    assert {"connmix_tx", "lua", "tests", "etc", "docs", "README.md"} <= scanned
    found = [f"{path}: {line}" for path, text in texts for line in outside_citations(text)]
    assert not found, "cite docs/ (or nothing) instead:\n" + "\n".join(found)


def test_every_docs_path_named_in_the_code_exists() -> None:
    missing = []
    for path, text in repository_texts():
        for name in DOCS_PATH.findall(text):
            if not (REPO / "docs" / name).is_file():
                missing.append(f"{path}: docs/{name}")
    assert not missing, "documents that do not exist:\n" + "\n".join(missing)


def test_every_markdown_link_between_documents_reaches_its_heading() -> None:
    broken = []
    for path, text in repository_texts():
        if not path.endswith(".md"):
            continue
        folder = (REPO / path).parent
        for target, anchor in MD_LINK.findall(text):
            if not target and not anchor:
                continue  # not a link to a document or a heading
            document = (folder / target).resolve() if target else REPO / path
            if not document.is_file():
                broken.append(f"{path}: {target}")
            elif anchor and anchor not in heading_anchors(document.read_text(encoding="utf-8")):
                broken.append(f"{path}: {target or ''}#{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)

