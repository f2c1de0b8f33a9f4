"""The app as an MCP server (gradio's mcp extra): the tools are listed with their documented
arguments, and calling one through the MCP endpoint runs it on the server."""

import asyncio
import json

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("mcp")

from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamablehttp_client  # noqa: E402

TOOLS = ("block_importance", "plan_removal", "fuse_blocks")


def _call(url: str, calls: list[tuple[str, dict]]):
    async def go():
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                listed = {t.name: t for t in (await session.list_tools()).tools}
                results = [await session.call_tool(name, args) for name, args in calls]
                return listed, results

    return asyncio.run(go())


def _payload(result) -> dict:
    text = result.content[0].text
    try:
        return json.loads(text)
    except ValueError:  # gradio writes the dict as Python's repr
        import ast

        return ast.literal_eval(text)


def test_tools_are_documented_and_callable(live_app):
    url, ctx = live_app
    if not ctx.test_model:
        pytest.skip("drives the tiny test model")
    model = "tiny (test model)"
    listed, (scores, fused, bad) = _call(
        url,
        [
            ("block_importance", {"model": model, "windows": 2, "tokens_per_window": 32}),
            ("fuse_blocks", {"model": model, "blocks": "2", "method": "drop", "preset": "tiny"}),
            ("fuse_blocks", {"model": model, "blocks": "99", "preset": "tiny"}),
        ],
    )
    for name in TOOLS:
        schema = listed[name].inputSchema["properties"]
        assert "model" in schema and listed[name].description  # named, documented arguments
    assert "Macro Influence" in listed["block_importance"].description + json.dumps(
        listed["block_importance"].inputSchema
    )
    out = _payload(scores)
    assert not scores.isError and out["blocks"] == len(out["scores"]) == 6
    assert sorted(out["least_important_first"]) == list(range(6))
    assert out["scores"][out["least_important_first"][0]] == min(out["scores"])
    run = _payload(fused)
    assert not fused.isError and run["removed_blocks"] == [2] and run["blocks_after"] == 5
    assert run["perplexity"]["result"] == pytest.approx(run["perplexity"]["dropped"])  # 'drop' repairs nothing
    assert bad.isError and "does not exist" in bad.content[0].text  # a user mistake: one clear message
