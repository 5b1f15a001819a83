"""The debug console (issue 7): ``GET /console`` of the engine API and the page itself.

Without a browser: the page is served as self-contained HTML, with the usual 404 / 405 answers,
behind the access guard like every path.  In a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``.ci/run``; driven with Selenium): the seed walkthrough clicked
through on the page against a real ``twistd connmix --dev`` process on free loopback ports.

The walkthrough test takes a screenshot once the reply has arrived, into its temporary folder;
with ``CONNMIX_UPDATE_SCREENSHOT=1`` in the environment it writes ``docs/images/console.png`` (the
one the README shows) instead, so ordinary runs never touch a tracked file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO, in_asyncio, loopback_config, start_engine
from connmix_tx.config import AccessConfig
from connmix_tx.console import page
from connmix_tx.web import NOT_FOUND_BODY
from netclients import ALICE, BOB, basic, http_request
from procs import Process, config_data, free_ports, twistd, write_yaml

SCREENSHOT = REPO / "docs" / "images" / "console.png"

#: Chromium's flags for a quiet, bounded headless run that reaches nothing but loopback.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1100", "--force-device-scale-factor=1",
)
WAIT = 10.0  # seconds for anything the page does
#: Replies as the engine writes them (README.md, "The walkthrough"), shown as such on the page.
CONSUMED = '{"error":null,"result":{"success":true},"id":1}'
SENT = '{"error":null,"result":{"fail":0,"success":true,"total":1},"id":2}'
CALLED = '{"error":null,"result":{"success":true},"id":3}'


# The page, without a browser ----------------------------------------------------------------------


def test_page_loads_nothing_from_outside() -> None:
    html = page().decode("utf-8")
    assert html.startswith("<!doctype html>")
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html
    for match in re.finditer(r"""\b(src|href|action)\s*=\s*["']?([^"'\s>]*)""", html):
        assert match.group(2).startswith("data:"), match.group(0)  # only the empty favicon


def test_every_element_the_script_names_exists() -> None:
    html = page().decode("utf-8")
    ids = set(re.findall(r'\bid="([\w-]+)"', html))
    named = set(re.findall(r'\$\("([\w-]+)"\)', html)) | set(re.findall(r'data-clear="([\w-]+)"', html))
    for name in ("client", "api"):  # new Connection(name): NAME-log, NAME-status, NAME-connect, NAME-pane
        named |= {f"{name}-log", f"{name}-status", f"{name}-connect", f"{name}-pane"}
    assert named and named <= ids, named - ids


@in_asyncio
async def test_console_is_served_with_the_site(engine: Any) -> None:
    for path in ("/console", "/console/"):
        reply = await http_request(engine.api_port, "GET", path)
        assert (reply.status, reply.body) == (200, page()), path
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in reply.headers["content-security-policy"]
        assert "connect-src ws: wss:" in reply.headers["content-security-policy"]
    reply = await http_request(engine.api_port, "HEAD", "/console")
    assert reply.status == 200 and reply.body == b""
    reply = await http_request(engine.api_port, "POST", "/console", b"{}")
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert reply.json["E"]["c"] == -32601
    reply = await http_request(engine.api_port, "GET", "/console/app.js")
    assert (reply.status, reply.body) == (404, NOT_FOUND_BODY)


@in_asyncio
async def test_console_is_behind_the_access_guard() -> None:
    config = dataclasses.replace(loopback_config(), access=AccessConfig(users=(ALICE, BOB), protected=True))
    running = await start_engine(config)
    try:
        port = running.api_port
        for headers, path in [(None, "/console"), (basic(ALICE, "wrong"), "/console"),
                              (None, "/console?username=alice&password=s3cret")]:  # query: /ws/v1 only
            reply = await http_request(port, "GET", path, headers=headers)
            assert reply.status == 401 and reply.headers["www-authenticate"] == 'Basic realm="connmix"'
            assert b"<html" not in reply.body
        for user in (ALICE, BOB):  # the read role is enough to load the page
            reply = await http_request(port, "GET", "/console", headers=basic(user))
            assert (reply.status, reply.body) == (200, page())
    finally:
        await running.stop()


# The page in headless Chromium --------------------------------------------------------------------


def chromium_binaries() -> tuple[str, str]:
    """The Chromium and chromedriver executables, or skip the test saying what is missing."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"chromium not installed: no {' or '.join(missing)} on PATH "
                    "(.ci/run installs Debian's chromium and chromium-driver)")
    return found["chromium"], found["chromedriver"]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium under Selenium, with its own profile folder, quit after the test."""
    chromium, chromedriver = chromium_binaries()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def dev_process(tmp_path: Path, **sections: Any) -> Iterator[dict[str, int]]:
    """``twistd connmix --dev`` on free loopback ports; yields the ports; stopped by its pid."""
    ports = dict(zip(("registry", "center_api", "mesh", "api", "client"), free_ports(5)))
    data = config_data(ports, **sections)
    process = Process(twistd("--dev", "-f", str(write_yaml(tmp_path / "connmix.yaml", data))), tmp_path)
    try:
        process.wait_for_line(r"start the protocol server")
        yield ports
    finally:
        assert process.stop() == 0, "\n".join(process.lines)


class Console:
    """The page's controls by element id, and waits bounded by ``WAIT``."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by = driver, By
        self.wait = WebDriverWait(driver, WAIT)

    def __getitem__(self, element_id: str) -> Any:
        return self.driver.find_element(self.by.ID, element_id)

    def type(self, element_id: str, text: str) -> None:
        field = self[element_id]
        field.clear()
        field.send_keys(text)

    def select(self, element_id: str, option: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self[element_id]).select_by_visible_text(option)

    def status(self, name: str, state: str) -> None:
        self.wait.until(lambda d: self[f"{name}-status"].text == state, f"{name} is not {state}")

    def entries(self, log: str, kind: str) -> list[str]:
        """The text of the ``kind`` entries (in, out, event, error, info) of a log, oldest first."""
        found = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{log} .entry.{kind} .body")
        return [element.text for element in found]

    def wait_entry(self, log: str, kind: str, pattern: str) -> str:
        """Wait for an entry of ``kind`` whose text matches ``pattern``; return its text."""
        def seen(driver: Any) -> str | bool:
            return next((text for text in self.entries(log, kind) if re.search(pattern, text)), False)

        return self.wait.until(seen, f"no {kind} entry matching {pattern!r} in #{log}")

    def errors(self) -> list[str]:
        """What the page logged at level SEVERE (script errors, CSP violations)."""
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_walkthrough_in_headless_chromium(browser: Any, tmp_path: Path) -> None:
    with dev_process(tmp_path) as ports:
        browser.get(f"http://127.0.0.1:{ports['api']}/console")
        ui = Console(browser)
        try:
            update = os.environ.get("CONNMIX_UPDATE_SCREENSHOT")
            walk_through(ui, ports, SCREENSHOT if update else tmp_path / "console.png")
            assert ui.errors() == []
        except BaseException:
            browser.save_screenshot(str(tmp_path / "failed.png"))
            print("page logs:", browser.get_log("browser"), "screenshot:", tmp_path / "failed.png")
            raise


def walk_through(ui: Console, ports: dict[str, int], screenshot: Path) -> None:
    """The README walkthrough on the console: client sends ``test``, the API consumes ``foo``, a
    click on the event's client_id, ``mesh.send`` of ``hello, world!`` (then the ``screenshot``);
    then subscribe and publish, and an unknown method from the raw box."""
    # The client pane connects to the protocol server and sends "test" (prefilled).
    assert ui["client-url"].get_attribute("value") == "ws://127.0.0.1:6790/"  # the default port
    ui.type("client-url", f"ws://127.0.0.1:{ports['client']}/")
    ui["client-connect"].click()
    ui.status("client", "open")
    assert ui["client-message"].get_attribute("value") == "test"
    ui["client-send"].click()
    ui.wait_entry("client-log", "out", r"^test$")

    # The API pane connects to /ws/v1 of the page's own origin and consumes foo (prefilled).
    assert ui["api-url"].get_attribute("value") == f"ws://127.0.0.1:{ports['api']}/ws/v1"
    ui["api-connect"].click()
    ui.status("api", "open")
    assert ui["consume-topic"].get_attribute("value") == "foo"
    ui["consume"].click()
    ui.wait_entry("api-log", "in", "reply to queue.consume #1\n" + re.escape(CONSUMED))
    event = ui.wait_entry("api-log", "event", r'"event": "queue.consume"')
    assert '"msg": {"data":"test","finish":true,"type":"text"}' in event and '"queue": "foo"' in event

    # A click on the event's client_id fills the mesh.send form; send "hello, world!".
    link = ui.driver.find_element(ui.by.CSS_SELECTOR, "#api-log .entry.event button.cid")
    client_id = link.get_attribute("data-client-id")
    assert re.fullmatch(r"\d{19}", client_id) and link.text == f'"{client_id}"'
    link.click()
    assert ui["send-client-id"].get_attribute("value") == client_id
    assert ui["call-client-id"].get_attribute("value") == client_id
    ui.type("send-data", "hello, world!")
    ui["send-submit"].click()
    ui.wait_entry("api-log", "in", "reply to mesh.send #2\n" + re.escape(SENT))
    ui.wait_entry("client-log", "in", r"^hello, world!$")
    # The walkthrough is done: this is the README's picture.
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert ui.driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")

    # conn.call subscribe, then mesh.publish to that channel reaches the client too.
    ui.select("call-func", "subscribe")
    assert ui["call-args"].get_attribute("value") == '["channel1"]'
    ui["call-submit"].click()
    ui.wait_entry("api-log", "in", "reply to conn.call #3\n" + re.escape(CALLED))
    ui["publish-submit"].click()  # channel1, "hello, channel!" (prefilled)
    ui.wait_entry("api-log", "in", r'reply to mesh.publish #4\n.*"total":1')
    ui.wait_entry("client-log", "in", r"^hello, channel!$")

    # The raw box: anything typed goes out as is; the server's error is shown as one.
    ui.type("raw-request", '{"method":"nope","params":[],"id":7}')
    ui["raw-submit"].click()
    ui.wait_entry("api-log", "error", r'error to nope #7\n\{"error":\{"code":-32601,')
    # The client got exactly the two messages.
    assert ui.entries("client-log", "in") == ["hello, world!", "hello, channel!"]


def test_credentials(browser: Any, tmp_path: Path) -> None:
    """With ``access.users``: the page loads with Basic credentials, and Chromium sends them on
    the same-origin API handshake too; the credentials fields serve an API on another origin."""
    users = {"users": [{"username": "alice", "password": "s3cret", "roles": ["read", "write"]}]}
    (tmp_path / "open").mkdir()
    (tmp_path / "secured").mkdir()
    with dev_process(tmp_path / "open") as plain, dev_process(tmp_path / "secured", access=users) as secured:
        # The console of an engine without users, pointed at the API of one with users.
        browser.get(f"http://127.0.0.1:{plain['api']}/console")
        ui = Console(browser)
        ui.type("api-url", f"ws://127.0.0.1:{secured['api']}/ws/v1")
        ui["api-connect"].click()  # no credentials: the handshake is refused (401)
        ui.wait_entry("api-log", "error", r"closed: code 1006")
        ui.driver.find_element(ui.by.CSS_SELECTOR, "details.credentials summary").click()
        ui.type("api-user", "alice")
        ui.type("api-password", "s3cret")
        ui["api-connect"].click()  # sent as ?username=alice&password=s3cret
        ui.status("api", "open")
        assert ui.entries("api-log", "info")[-2].endswith("password=***")  # never shown
        ui["ping"].click()
        ui.wait_entry("api-log", "in", r'"status":"server.pong"')

        # The secured engine's own console: Basic credentials for the page, reused by the API.
        browser.get(f"http://alice:s3cret@127.0.0.1:{secured['api']}/console")
        ui["api-connect"].click()
        ui.status("api", "open")
        ui["ping"].click()
        ui.wait_entry("api-log", "in", r'"status":"server.pong"')
