"""Smoke test of the Prefect server: a flow run is orchestrated by it and read back through the client."""

from __future__ import annotations

from prefect import flow, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings


@flow(name="infra-smoke")
def _double(value: int) -> int:
    return 2 * value


def test_flow_run_is_recorded_by_the_server(prefect_server_url):
    with temporary_settings({PREFECT_API_URL: prefect_server_url}):
        state = _double(21, return_state=True)
        assert state.result() == 42
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == prefect_server_url.rstrip("/")
            flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.state.is_completed()
    assert flow_run.name
