import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="package")
def harness():
    """One temporary Prefect server for every test here that runs a flow or a task runner. Stopped once
    tests/flows is done, not at the session's end: idle, it still took ~1.5% of a core for the rest of
    the suite (tests elsewhere that run flows in-process start their own)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield
