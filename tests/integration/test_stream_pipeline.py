"""The streaming product end to end: a real worker process on the session's broker, tritonserver serving the
reranker, and embedded Qdrant — from item, click and query events to recommendations.

The module gets its own topics and consumer group (a run id in every name), so what other tests produce on
the shared broker never reaches this worker. The reranker is the offline default model (untrained: these
tests check the plumbing, not ranking quality), exported as a new version into the session's model
repository; the collaborative retriever is a freshly initialised SASRec saved as artefacts, so the "cf"
vector path (catalogue vectors, query vectors, fusion) runs for real too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from instructrec.config import Settings
from instructrec.events import ClickEvent, DeadLetter, QueryEvent, decode, encode
from instructrec.infra.worker import WorkerProcess
from tests.integration.pipeline import MODEL, N_ITEMS, TIMEOUT_S, Listener, ask, http
from workers.index import index_dataset
from workers.replay import ReplayConfig, replay, replay_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replayed(worker: WorkerProcess, settings: Settings, dataset) -> list[ClickEvent]:
    """The first three users' clicks, replayed once for the module and applied by the worker before any test
    that asks for a user with a history runs, whichever of them runs first (or alone, with `-k`)."""
    events = replay_events(dataset, ReplayConfig(users=3, max_per_user=25, query_every=0))
    loop = asyncio.new_event_loop()  # its own: the tests' loops are pytest-asyncio's
    try:
        loop.run_until_complete(replay(settings.kafka, events, progress=False))
    finally:
        loop.close()
    histories = {u: len({e.item_id for e in events if e.user_id == u}) for u in {e.user_id for e in events}}
    deadline = time.monotonic() + TIMEOUT_S  # clicks and queries are separate topics: let the clicks land
    for user, length in histories.items():
        while len(http("GET", worker.url(f"/users/{user}/context"))[1].get("history", ())) < length:
            assert time.monotonic() < deadline, f"{user}'s clicks not applied within {TIMEOUT_S:g} s"
            time.sleep(0.5)
    return events


# ------------------------------------------------------------------------------------------------ tests


async def test_the_catalog_is_indexed(worker: WorkerProcess, settings: Settings, dataset) -> None:
    await index_dataset(settings.kafka, dataset, limit=N_ITEMS, progress=False)
    async with asyncio.timeout(TIMEOUT_S):
        while (worker.health() or {}).get("checks", {}).get("qdrant", {}).get("items") != N_ITEMS:
            await asyncio.sleep(1.0)
    status, state = http("GET", worker.url("/health"))
    assert status == 200 and state["checks"]["reranker"]["circuit"] == "closed"


async def test_a_replayed_user_gets_recommendations_without_consumed_items(
    replayed: list[ClickEvent], settings: Settings, reranker_version: str
) -> None:
    users = sorted({e.user_id for e in replayed})
    consumed = {u: {e.item_id for e in replayed if e.user_id == u} for u in users}
    queries = [QueryEvent(user_id=u, k=10) for u in users]
    queries.append(QueryEvent(user_id=users[0], k=5, text="a 1990s sci-fi thriller"))
    got = await ask(settings, queries)
    for query in queries:
        [answer] = got[query.request_id]
        assert not answer.degraded, answer.reason
        assert answer.model_version == reranker_version
        assert len(answer.items) == query.k
        assert not consumed[query.user_id] & {item.item_id for item in answer.items}
        assert all(item.title for item in answer.items)
        expected = "-I2-T3-" if query.text else "-I0-T3-"
        assert expected in answer.template_id and answer.template_id[:2] in ("P1", "P2")
        assert answer.timings["rerank_ms"] > 0


async def test_a_text_request_is_answered_with_compliant_reasoned_items(
    worker: WorkerProcess, dataset, replayed: list[ClickEvent]
) -> None:
    """A free-text request through POST /recommend: every item satisfies what it asks (the category, the
    period, the exclusion), says why, and the answer carries the instruction the model scored."""
    user = dataset.users[0]
    text = "a gritty 1990s crime story, nothing animated"
    status, answer = http("POST", worker.url("/recommend"), {"user_id": user, "k": 10, "text": text})
    assert status == 200 and not answer["degraded"], answer.get("reason")
    assert len(answer["items"]) == 10 and answer["template_id"][3:5] == "I2"
    assert text in answer["instruction"]
    by_id = {item.id: item for item in dataset.items}
    for item in answer["items"]:
        known = by_id[item["item_id"]]
        assert "Crime" in known.genres and "Animation" not in known.genres and 1990 <= known.year <= 1999
        assert item["reasons"] and item["reasons"][0].startswith("matches: 1990s, crime"), item["reasons"]
    assert any(r.startswith("because you watched ") for item in answer["items"] for r in item["reasons"])


async def test_post_recommend_and_the_other_views(
    worker: WorkerProcess, dataset, replayed: list[ClickEvent]
) -> None:
    user = dataset.users[0]
    status, answer = http(
        "POST", worker.url("/recommend"), {"user_id": user, "k": 3, "text": "something funny"}
    )
    assert status == 200 and len(answer["items"]) == 3 and answer["user_id"] == user
    status, error = http("POST", worker.url("/recommend"), {"user_id": user, "k": "three"})
    assert status == 400 and error["fields"] == ["k"]
    assert http("POST", worker.url("/recommend"), b"{not json")[0] == 400
    status, context = http("GET", worker.url(f"/users/{user}/context"))
    assert status == 200 and context["intention"] == "something funny" and context["history"]
    assert http("GET", worker.url("/users/nobody-at-all/context"))[0] == 404
    with urllib.request.urlopen(worker.url("/metrics")) as response:
        text = response.read().decode()
    assert (
        'instructrec_events_in_total{topic="queries"}' in text and "instructrec_stage_seconds_bucket" in text
    )


async def test_bad_events_reach_the_dead_letter_topic_and_agents_keep_running(
    worker: WorkerProcess, settings: Settings, dataset
) -> None:
    bad = {
        settings.kafka.topics.clicks: (b"u1", b'{"user_id": "u1", "item_id": "1", "kind": "teleport"}'),
        settings.kafka.topics.queries: (b"u1", b"\x00 not json"),
        settings.kafka.topics.items: (b"9", b'{"item_id": "9", "title": ""}'),
    }
    async with Listener(settings, "dead_letter") as listener:
        producer = AIOKafkaProducer(**settings.kafka.aiokafka_kwargs())
        await producer.start()
        try:
            sent = {
                topic: await producer.send_and_wait(topic, key=key, value=value)
                for topic, (key, value) in bad.items()
            }
            # a mis-keyed click: valid, but not partitioned by its user
            click = ClickEvent(user_id="u2", item_id="1", kind="click")
            wrong_key = await producer.send_and_wait(
                settings.kafka.topics.clicks, key=b"u3", value=encode(click)
            )
        finally:
            await producer.stop()
        expected = {(topic, meta.partition, meta.offset) for topic, meta in sent.items()}
        expected.add((settings.kafka.topics.clicks, wrong_key.partition, wrong_key.offset))

        def letters() -> dict[tuple, DeadLetter]:
            found = (decode(DeadLetter, value) for *_, value in listener.messages)
            return {(d.source_topic, d.partition, d.offset): d for d in found}

        await listener.wait_for(lambda: expected <= set(letters()))
        got = {topic: letters()[(topic, meta.partition, meta.offset)] for topic, meta in sent.items()}
    topics = settings.kafka.topics
    assert "field 'kind'" in got[topics.clicks].error
    assert got[topics.queries].raw_bytes == b"\x00 not json" and "not JSON" in got[topics.queries].error
    assert "field 'title'" in got[topics.items].error
    # ... and the agents are still answering
    status, answer = http("POST", worker.url("/recommend"), {"user_id": dataset.users[1], "k": 2})
    assert status == 200 and len(answer["items"]) == 2


def test_cli_produce_and_subscribe(
    worker: WorkerProcess, settings: Settings, tmp_path: Path, capsysbinary
) -> None:
    """`instructrec produce` validates JSON lines and sends them; `instructrec subscribe` prints JSON lines."""
    import argparse

    from workers.commands import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.handler(args, settings)

    lines = tmp_path / "queries.jsonl"
    lines.write_text(
        '{"user_id": "cli-user", "k": 2, "request_id": "cli-1"}\n{"user_id": "cli-user", "k": 0}\n'
    )
    assert cli("produce", "queries", "--file", str(lines)) == 1  # one line was invalid: reported, not sent
    assert (
        cli(
            "subscribe",
            "recommendations",
            "--from-beginning",
            "--key",
            "cli-user",
            "--count",
            "1",
            "--timeout",
            str(TIMEOUT_S),
        )
        == 0
    )
    [line] = capsysbinary.readouterr().out.splitlines()
    answer = json.loads(line)
    assert answer["request_id"] == "cli-1" and answer["user_id"] == "cli-user"


async def test_the_try_it_page_in_a_headless_browser(
    worker: WorkerProcess, dataset, replayed: list[ClickEvent], reranker_version: str, tmp_path: Path
) -> None:
    """The page at `/` in a real chromium: pick a replayed user from the suggestions, type a request, submit,
    and read what the page shows; the screenshot is kept as a test artefact. (Before the test that stops
    Triton: after it this worker cannot reach the reranker, and answers carry no instruction.)"""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does)"
        )
    user, text = dataset.users[0], "a funny movie from the 90s, not a horror"
    async with Browser(tmp_path / "chromium") as browser:
        await browser.send("Page.navigate", url=worker.url("/"))
        await browser.wait_for(f"document.querySelector('#users option[value={json.dumps(user)}]')", 30)
        await browser.type("#user", user)
        await browser.type("#text", text)
        await browser.type("#k", "5")
        await browser.click("#submit")
        await browser.wait_for(ANSWERED_OR_FAILED, TIMEOUT_S)
        await browser.wait_for(LIVE_LATENCY_SHOWN, 30)  # a refresh of the live figures after the answer
        shown = await browser.evaluate(PAGE_STATE)
        shot = await browser.screenshot(screenshot_path())
        assert browser.errors() == []
    assert not shown["error"], shown["error"]
    assert shown["facts"]["model version"] == reranker_version and shown["facts"]["degraded"] == "no"
    assert shown["facts"]["user"] == user and len(shown["items"]) == 5
    assert all(item["title"] for item in shown["items"]) and any(item["reasons"] for item in shown["items"])
    assert text in shown["instruction"] and shown["timings"]
    live = shown["live"]
    assert live["served model"] == reranker_version and live["reranker circuit"] == "closed"
    assert live["query path"].startswith("p50 ") and live["events/s"][0].isdigit() and shown["prequential"]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000


async def test_with_the_reranker_unloaded_or_triton_stopped_answers_are_degraded_not_lost(
    worker: WorkerProcess, local_infra, dataset
) -> None:
    import tritonclient.http as httpclient

    def degraded_answers(n: int) -> list[dict]:
        out = []
        for _ in range(n):
            status, answer = http("POST", worker.url("/recommend"), {"user_id": dataset.users[2], "k": 4})
            assert status == 200 and answer["degraded"] and "reranker unavailable" in answer["reason"], answer
            assert len(answer["items"]) == 4 and answer["model_version"] == "retrieval"
            out.append(answer)
        return out

    triton = httpclient.InferenceServerClient(local_infra.state.triton.http_url, network_timeout=TIMEOUT_S)
    triton.unload_model(MODEL)
    degraded_answers(3)
    # The whole server down: connections refused, then the client's circuit opens; answers keep coming.
    report = local_infra.infrastructure.down(components=["triton"])
    assert report.ok, report.problems
    try:
        degraded_answers(3)
    finally:
        local_infra.start_triton(models=[MODEL])  # back (on new ports) for the modules that run next


# ------------------------------------------------------------------------------------------------ browser

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download cannot work here
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",  # nothing outside loopback can be reached: do not try
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,900",
)
ANSWERED_OR_FAILED = "!document.querySelector('#answer').hidden || document.querySelector('#status.error')"
LIVE_LATENCY_SHOWN = (
    "[...document.querySelectorAll('#live-facts dd')].some(dd => dd.textContent.startsWith('p50'))"
)
# What the page shows, read from the DOM as text (as a person reads it).
PAGE_STATE = """(() => {
  const text = (node) => node ? node.textContent.trim() : "";
  const facts = (id) => Object.fromEntries([...document.querySelectorAll(`#${id} dt`)].map(
    (dt) => [text(dt), text(dt.nextElementSibling)]));
  return {
    error: text(document.querySelector("#status.error")),
    facts: facts("facts"),
    items: [...document.querySelectorAll("#items > li")].map((li) => ({
      title: text(li.querySelector(".title")),
      reasons: [...li.querySelectorAll(".reasons li")].map(text),
    })),
    instruction: text(document.querySelector("#instruction")),
    timings: [...document.querySelectorAll("#timings li")].map(text),
    live: facts("live-facts"),
    prequential: [...document.querySelectorAll("#prequential tbody tr")].map(text),
  };
})()"""


def screenshot_path() -> Path:
    folder = os.environ.get("INSTRUCTREC_TEST_ARTIFACTS")
    root = Path(folder) if folder else Path(__file__).resolve().parents[2] / ".state" / "test-artifacts"
    return root / "try-it.png"


class Browser:
    """Headless chromium with one tab, driven over the Chrome DevTools Protocol: JSON commands on a
    websocket (aiohttp's client). Page errors (exceptions, console errors, blocked resources) are kept."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self._events: list[dict] = []
        self._next_id = 0

    async def __aenter__(self) -> Browser:
        self.profile.mkdir(parents=True)
        self._log = (self.profile.parent / "chromium.log").open("wb")
        self._process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._http = aiohttp.ClientSession()
        try:
            port = await self._devtools_port()
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as response:
                tab = next(t for t in await response.json() if t["type"] == "page")
            self._socket = await self._http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)
            for domain in ("Page", "Runtime", "Log"):
                await self.send(f"{domain}.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.close()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()

    async def _devtools_port(self, timeout_s: float = 30.0) -> int:
        """Chromium writes the port it chose (--remote-debugging-port=0) into its profile folder."""
        active = self.profile / "DevToolsActivePort"
        async with asyncio.timeout(timeout_s):
            while not (active.exists() and active.read_text().strip()):
                if self._process.poll() is not None:
                    raise RuntimeError(f"chromium exited with {self._process.returncode}: see chromium.log")
                await asyncio.sleep(0.1)
        return int(active.read_text().split()[0])

    async def send(self, method: str, **params) -> dict:
        self._next_id += 1
        await self._socket.send_json({"id": self._next_id, "method": method, "params": params})
        async for message in self._socket:
            reply = json.loads(message.data)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._events.append(reply)
        raise ConnectionError("chromium closed the DevTools connection")

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not await self.evaluate(f"!!({expression})"):
                    await asyncio.sleep(0.25)
        except TimeoutError:
            raise AssertionError(f"not true within {timeout_s:g} s: {expression}") from None

    async def type(self, selector: str, text: str) -> None:
        """Focus the field, select what it holds and type over it (one input event, as a paste makes)."""
        await self.evaluate(
            f"(e => {{ e.focus(); e.select(); }})(document.querySelector({json.dumps(selector)}))"
        )
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        x, y = await self.evaluate(
            f"""(e => {{ e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})(document.querySelector({json.dumps(selector)}))"""
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: Path) -> Path:
        """The whole page, not only the window, as a PNG."""
        size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and error log entries (a blocked script or style among them)."""
        found = []
        for event in self._events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text", "exception"))
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"{params['entry']['source']}: {params['entry']['text']}")
        return found
