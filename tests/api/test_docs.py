"""``/docs`` works without internet access: Swagger UI comes from the package, not a CDN."""

from __future__ import annotations

import httpx

from tests.api.conftest import LiveApi


def test_the_docs_page_and_everything_it_loads_come_from_the_server(live_api: LiveApi) -> None:
    page = httpx.get(f"{live_api.url}/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "https://" not in html and "http://" not in html  # nothing from elsewhere
    for path, kind, at_least in [
        ("/docs/static/swagger-ui-bundle.js", "javascript", 1_000_000),
        ("/docs/static/swagger-ui.css", "text/css", 100_000),
    ]:
        assert path in html
        r = httpx.get(f"{live_api.url}{path}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert len(r.content) >= at_least
    spec = httpx.get(f"{live_api.url}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.1")  # which the bundled Swagger UI 5 renders
    assert "/docs" not in spec["paths"]
