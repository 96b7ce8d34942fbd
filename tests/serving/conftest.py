"""Serving fixtures: a SQLite tracking store per module, and a `liverseg serve` replica of a promoted
no-liver model shared by a module's tests (one start, not one per test)."""

import pytest

from support.servers import WEBHOOK_HMAC, serve_champion


@pytest.fixture(scope="module")
def module_mlflow(tmp_path_factory):
    """A SQLite tracking store for the module; MLFLOW_TRACKING_URI and the working folder point at it."""
    root = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        yield root


@pytest.fixture(scope="module")
def server(module_mlflow, store_path):
    """A replica with a 1 MiB upload limit and a 3 s body deadline, polling its alias every second and
    retrying a failed version after 1, 2, 4, 4 ... s; webhooks signed with support.servers.WEBHOOK_HMAC."""
    sets = ("serve.poll_s=1", "serve.retry_max_s=4")
    env = {"LIVERSEG_WEBHOOK_SECRET": WEBHOOK_HMAC}
    yield from serve_champion(store_path, module_mlflow, 1, 3, *sets, env=env)
