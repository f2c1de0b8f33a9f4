"""The same flow through the app's API with gradio_client: load -> importance -> plan -> preview
-> run (+ a baseline) -> generate -> export, then a second client that must not see the first's work."""

import time

import pytest

pytestmark = pytest.mark.e2e

gradio_client = pytest.importorskip("gradio_client")


def _wait(client, kind: str, timeout: float = 120.0) -> dict:
    """Poll /job_status until the newest job of `kind` has finished; fail on an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in client.predict(api_name="/job_status")["jobs"] if j["kind"] == kind]
        if jobs and all(j["status"] in ("done", "failed", "cancelled") for j in jobs):
            bad = [j for j in jobs if j["status"] != "done"]
            assert not bad, f"{kind}: {bad}"
            return jobs[-1]
        time.sleep(0.25)
    raise AssertionError(f"{kind} did not finish in {timeout} s")


def test_api_flow(live_app):
    url, ctx = live_app
    if not ctx.test_model:
        pytest.skip("the API test drives the tiny test model")
    client = gradio_client.Client(url, verbose=False)
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    for name in (
        "/load_model",
        "/compute_importance",
        "/set_plan",
        "/preview_drop",
        "/start_run",
        "/stop",
        "/generate",
        "/export",
        "/one_click_demo",
        "/job_status",
        "/results",
    ):
        assert name in endpoints

    status, _ = client.predict(kind="tiny (test model)", text="", api_name="/load_model")
    assert "Load" in status
    _wait(client, "load")

    client.predict(kind="bundled corpus", pasted="", upload=None, metrics=["mi", "bi"], api_name="/compute_importance")
    _wait(client, "importance")

    plan = client.predict(mode="pick blocks", blocks=[4, 5], k=2, api_name="/set_plan")
    assert plan["blocks"] == sorted([4, 5], key=lambda b: b) or set(plan["blocks"]) == {4, 5}

    client.predict(kind="bundled corpus", pasted="", upload=None, api_name="/preview_drop")
    _wait(client, "preview")

    client.predict(
        preset="tiny",
        method="fusegpt",
        baselines=["drop"],
        kind="bundled corpus",
        pasted="",
        upload=None,
        api_name="/start_run",
    )
    _wait(client, "run")

    client.predict(prompt="Hello", max_new=8, api_name="/generate")
    _wait(client, "generate")

    results = client.predict(api_name="/results")
    assert results["model"]["blocks"] == 6
    assert set(results["importance"]) == {"mi", "bi"}
    assert results["preview"]["dropped"] > 0
    models = [row["model"] for row in results["compare"]]
    assert models == ["original", "#1 fusegpt", "#2 drop"]  # the drop run is the dropped baseline: one row
    assert all(row["blocks"] == 4 for row in results["compare"][1:])
    assert [g["label"] for g in results["generations"]] == ["original", "#1 fusegpt", "#2 drop"]

    recipe_file, report_file, cli, _, _ = client.predict(run_id=1, api_name="/export")
    assert recipe_file.endswith("recipe.json") and "fusegpt_core fuse --recipe" in cli
    _wait(client, "export")

    # another visitor has their own, empty session
    other = gradio_client.Client(url, verbose=False)
    assert other.predict(api_name="/results")["compare"] == []
    assert other.predict(api_name="/job_status")["jobs"] == []
