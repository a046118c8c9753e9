"""The main job runs without the optional extras: no `claude` (the Claude Agent
SDK) and no `otel` (OpenTelemetry). Checked in a fresh interpreter in which
importing either raises, as on a machine that never installed them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys

    class Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("claude_agent_sdk", "opentelemetry", "mcp"):
                raise ImportError(f"{name} is not installed")

    sys.meta_path.insert(0, Absent())
    """
)


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_builds_and_deletes_a_session_without_the_claude_extra(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run(
        f"""
        import asyncio, os
        os.chdir({str(tmp_path)!r})
        import httpx
        from turnrelay.services import build_services, with_default_model
        from turnrelay.settings import Settings
        from turnrelay.store.migrate import migrate

        async def main():
            settings = with_default_model(Settings())
            await migrate(settings.database_url)
            services = build_services(settings, "serve")
            await services.startup()
            try:
                app = services.api()
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    sid = (await c.post("/api/chat/sessions")).json()["id"]
                    print((await c.delete(f"/api/chat/sessions/{{sid}}")).status_code)
            finally:
                await services.shutdown()

        asyncio.run(main())
        """
    )
    assert out.split()[-1] == "204"


def test_tracing_off_needs_nothing_of_opentelemetry() -> None:
    out = run(
        """
        import turnrelay.cli, turnrelay.executor.runner, turnrelay.api.control
        from turnrelay import tracing
        tracing.setup(None, "turnrelay-test")
        with tracing.span("turn.submit", turn_id="t") as s:
            assert s is None
        assert not tracing.enabled() and tracing.inject() == {} and tracing.trace_id() is None
        print("off")
        """
    )
    assert out.strip() == "off"


def test_an_endpoint_without_the_otel_extra_is_a_clear_config_error() -> None:
    out = run(
        """
        from turnrelay import tracing
        from turnrelay.errors import ConfigError
        try:
            tracing.setup("http://127.0.0.1:4318", "turnrelay-test")
        except ConfigError as exc:
            print(exc.detail)
        """
    )
    assert "pip install 'turnrelay[otel]'" in out
