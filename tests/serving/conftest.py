"""Serving fixtures: a `liverseg serve` replica of a promoted no-liver model."""

import pytest

from support.servers import serve_champion


@pytest.fixture
def server(mlflow_uri, store_path, tmp_path):
    yield from serve_champion(store_path, tmp_path, max_mb=1, upload_timeout=3)
