"""The dashboard in a real browser, against a real server running real jobs: what a person sees
and what the buttons do."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect

from browser.support import TOKEN, save_screenshot
from cortex.client import Client
from helpers import DeployedApi, Server, deploy_fixture, wait_for, wait_for_status

# The page polls every 0.5 s: a change on the server must show within this (with room for a
# loaded 2-core machine), or the dashboard is not live.
UPDATE_LIMIT_S = 2.0
latencies_s: list[float] = []


@pytest.fixture(scope="module")
def client(dashboard: Server) -> Iterator[Client]:
    with Client(dashboard.url, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def api(client: Client, tmp_path_factory: pytest.TempPathFactory) -> DeployedApi:
    return deploy_fixture(client, "recorder", tmp_path_factory.mktemp("apis"))


def sign_in(page: Page, server: Server, token: str = TOKEN) -> None:
    page.goto(f"{server.url}/ui")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("dialog")).to_be_hidden()


def submit(
    client: Client,
    api: DeployedApi,
    items: list[Any],
    workers: int,
    batch_size: int = 1,
    **extra: Any,
) -> str:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": batch_size}, **extra}
    return str(client.submit(api.name, body)["job_id"])


def job_status(page: Page) -> Any:
    return page.locator(".head .badge")


def test_sign_in_keeps_the_token_for_the_tab_and_sends_it_as_a_bearer_header(
    page: Page, dashboard: Server, api: DeployedApi
) -> None:
    page.goto(f"{dashboard.url}/ui")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()  # the first data call was refused: the page asks
    page.get_by_label("Token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("The server refused that token.")).to_be_visible()

    page.get_by_label("Token").fill(TOKEN)
    with page.expect_request(lambda r: r.url.endswith("/get")) as first:
        page.get_by_role("button", name="Sign in").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("link", name=api.name)).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('cortex.token')") == TOKEN
    assert first.value.all_headers()["authorization"] == f"Bearer {TOKEN}"

    page.reload()  # session storage outlives a reload of the tab
    expect(page.get_by_role("link", name=api.name)).to_be_visible()
    expect(dialog).to_be_hidden()

    page.get_by_role("button", name="Sign out").click()
    expect(dialog).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('cortex.token')") is None


def test_a_job_runs_to_the_end_in_front_of_the_reader(
    page: Page, dashboard: Server, client: Client, api: DeployedApi
) -> None:
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/ui/#/apis/{api.name}")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()

    # 13 batches on 2 workers, about 3 s: one prints two lines, one always fails.
    items: list[Any] = [{"sleep": 0.4}] * 11 + [{"lines": 2}, "fail"]
    job_id = submit(client, api, items, workers=2, max_attempts=2)
    row = page.locator(f"tr[data-job='{job_id}']")
    expect(row).to_be_visible()  # the job appears without a reload
    row.get_by_role("link", name=job_id).click()
    expect(page).to_have_url(re.compile(f"#/jobs/{api.name}/{job_id}$"))

    # Record, in the page, every percentage the bar shows and when the status turns final.
    page.evaluate(
        """() => {
        window.seen = new Set();
        const bar = document.querySelector('[role=progressbar]');
        const badge = document.querySelector('.head .badge');
        const note = () => {
          window.seen.add(bar.getAttribute('aria-valuenow'));
          const status = badge.dataset.status;
          if (status && !['status_running', 'status_enqueuing'].includes(status) && !window.endedAt)
            window.endedAt = Date.now() / 1000;
        };
        note();
        new MutationObserver(note).observe(document.querySelector('main'),
          {subtree: true, attributes: true, childList: true, characterData: true});
      }"""
    )
    bar = page.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=60_000)
    expect(bar).to_contain_text("100%")
    expect(job_status(page)).to_have_text("completed with failures")
    seen = {int(v) for v in page.evaluate("[...window.seen].filter(v => v !== null)")}
    assert any(0 < v < 100 for v in seen), f"the bar never moved between 0 and 100: {seen}"

    # How long after the server ended the job the page said so (same machine, same clock).
    ended = client.get_job(api.name, job_id)["job_status"]["end_time"]
    ended_s = datetime.datetime.fromisoformat(ended).timestamp()
    latency_s = page.evaluate("window.endedAt") - ended_s
    latencies_s.append(latency_s)
    print(f"the page showed the job's end {latency_s:.3f} s after the server wrote it")
    assert 0 <= latency_s < UPDATE_LIMIT_S

    failed = page.get_by_role("region", name="failed batches")
    expect(failed.get_by_text("ValueError: cannot handle item 'fail'", exact=True)).to_be_visible()
    expect(failed.get_by_role("cell", name="2", exact=True)).to_be_visible()  # attempts
    failed.get_by_text("traceback", exact=True).click()
    expect(failed.get_by_text("Traceback (most recent call last)")).to_be_visible()

    log = page.get_by_role("log")
    expect(log).to_contain_text("line 1")  # printed by predict, in stdout
    expect(log).to_contain_text(re.compile(r"worker-\d stdout \[batch [0-9a-f-]+\] done "))
    expect(page.get_by_text("the job has ended: this is its whole log")).to_be_visible()

    workers = page.get_by_role("region", name="workers")
    expect(workers.locator("tr[data-worker]")).to_have_count(2)
    expect(workers.locator("tr[data-worker='worker-0']")).to_contain_text("succeeded")
    submission = page.get_by_role("region", name="submission")
    expect(submission).to_contain_text('"max_attempts": 2')
    expect(submission).to_contain_text('"kind": "item_list"')
    expect(page.get_by_role("region", name="configuration")).to_contain_text('"kind": "BatchAPI"')
    expect(page.get_by_role("button", name="Stop job")).to_be_disabled()

    path = save_screenshot(page, "dashboard-job.png")
    assert path.stat().st_size > 10_000


def test_the_stop_button_stops_a_running_job(
    page: Page, dashboard: Server, client: Client, api: DeployedApi
) -> None:
    job_id = submit(client, api, [{"sleep": 60}] + ["a"] * 5, workers=1)
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/ui/#/jobs/{api.name}/{job_id}")
    expect(job_status(page)).to_have_text("running", timeout=30_000)
    worker = page.locator("tr[data-worker='worker-0']")
    expect(worker).to_contain_text("running", timeout=30_000)
    deletes: list[Request] = []
    page.on("request", lambda r: deletes.append(r) if r.method == "DELETE" else None)
    stop = page.get_by_role("button", name="Stop job")

    page.once("dialog", lambda dialog: dialog.dismiss())  # changed their mind
    stop.click()
    expect(stop).to_be_enabled()
    assert deletes == []

    page.once("dialog", lambda dialog: dialog.accept())
    stop.click()
    expect(job_status(page)).to_have_text("stopped")
    expect(page.get_by_text(f"stopped job {job_id}")).to_be_visible()
    expect(stop).to_be_disabled()
    assert len(deletes) == 1
    assert client.get_job(api.name, job_id)["job_status"]["status"] == "status_stopped"
    wait_for(lambda: not dashboard.worker_processes(job_id), 15, "the stopped job's worker to exit")
    expect(worker).not_to_contain_text("running")


def test_failed_batches_are_re_run_from_the_job_page(
    page: Page, dashboard: Server, client: Client, api: DeployedApi
) -> None:
    items = ["a", "fail-unless-retry", "b", "fail-unless-retry"]
    old = submit(client, api, items, workers=1, max_attempts=1)
    assert wait_for_status(client, api.name, old)["status"] == "status_completed_with_failures"
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/ui/#/jobs/{api.name}/{old}")
    expect(
        page.get_by_role("region", name="failed batches").locator("tr[data-batch]")
    ).to_have_count(2)

    page.get_by_role("button", name="Re-run failed batches").click()
    expect(page).not_to_have_url(re.compile(f"{old}$"))
    new = page.url.rsplit("/", 1)[1]
    expect(page.get_by_role("link", name=old)).to_be_visible()  # "Retry of"
    expect(page.get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", "100", timeout=30_000
    )
    expect(job_status(page)).to_have_text("succeeded")
    expect(page.get_by_role("region", name="failed batches")).to_be_hidden()
    status = client.get_job(api.name, new)["job_status"]
    assert (status["retry_of"], status["total_batch_count"]) == (old, 2)


def test_the_overview_lists_the_apis_with_their_latest_job(
    page: Page, dashboard: Server, client: Client, api: DeployedApi, tmp_path: Path
) -> None:
    other = deploy_fixture(client, "recorder", tmp_path)
    sign_in(page, dashboard)
    rows = page.locator("tr[data-api]")
    expect(rows.filter(has_text=other.name)).to_contain_text("no job yet")
    job_id = submit(client, other, ["a"], workers=1)
    expect(rows.filter(has_text=other.name).get_by_role("link", name=job_id)).to_be_visible()
    expect(rows.filter(has_text=other.name)).to_contain_text("succeeded", timeout=30_000)
    rows.filter(has_text=other.name).get_by_role("link", name=other.name).click()
    expect(page.get_by_role("heading", name=other.name)).to_be_visible()


def test_what_user_code_wrote_is_shown_as_text_and_never_run(
    page: Page, dashboard: Server, client: Client, api: DeployedApi
) -> None:
    html = '<img src="x" onerror="window.pwned = 1"><script>window.pwned = 2</script>'
    # One batch: writes the markup to stderr, carries it in its payload, then fails.
    job_id = submit(client, api, [{"stderr": html}, html, "fail"], 1, batch_size=3, max_attempts=1)
    assert wait_for_status(client, api.name, job_id)["status"] == "status_completed_with_failures"
    sign_in(page, dashboard)
    page.goto(f"{dashboard.url}/ui/#/jobs/{api.name}/{job_id}")
    expect(page.get_by_role("log")).to_contain_text("stderr [batch ", timeout=15_000)
    expect(page.get_by_role("log")).to_contain_text(html)
    failed = page.get_by_role("region", name="failed batches")
    failed.get_by_text("payload", exact=True).click()
    expect(failed.locator("pre").last).to_contain_text('"<img src=\\"x\\" onerror=')
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.pwned") is None
