from tests.helpers import running_sidecar


async def test_health_and_empty_usage(database_url: str) -> None:
    async with running_sidecar(database_url) as sc:
        status, body = await sc.request("GET", "/health", admin=False)
        assert (status, body) == (200, {"status": "ok"})
        assert await sc.usage() == {"accounts": {}, "channels": {}}
