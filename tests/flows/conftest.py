import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server for every test that runs a flow or a task runner."""
    with prefect_test_harness(server_startup_timeout=120):
        yield
