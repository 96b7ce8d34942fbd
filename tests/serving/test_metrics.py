"""The metrics of several worker processes merged (prometheus_client's multiprocess mode), should a replica
ever run more than one: each process writes its own files, /metrics of any of them adds them up."""

import os
import subprocess
import sys
import textwrap

from prometheus_client.parser import text_string_to_metric_families

WORKER = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    from liverseg.serving.metrics import Metrics
    m = Metrics()
    m.request("/segment", 200, 0.5, 1000, 20, None)
    m.request("/segment", 413, 0.01, 0, 60, "max_upload_mb")
    info = SimpleNamespace(name="liver-unet", version=sys.argv[1], alias="champion", uri="models:/liver-unet@champion")
    m.loaded("champion", info, 2.0, False)
    if len(sys.argv) > 2:
        m.loaded("champion", SimpleNamespace(**{**vars(info), "version": sys.argv[2]}), 2.0, True)
    m.queue_depth.inc(3)
    m.follow_state("champion", sys.argv[1] == "1")
    sys.stdout.write(m.render()[0].decode())
""")


def test_multiprocess_mode_adds_up_every_worker(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for versions in (["1"], ["1", "2"]):  # two workers; the second switched from v1 to v2
        out = subprocess.run([sys.executable, "-c", WORKER, *versions], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(out.stdout)
        for s in family.samples
    }
    assert samples[("liverseg_requests_total", (("route", "/segment"), ("status", "200")))] == 2
    assert samples[("liverseg_refusals_total", (("limit", "max_upload_mb"), ("status", "413")))] == 2
    assert samples[("liverseg_request_seconds_count", (("route", "/segment"),))] == 4
    assert samples[("liverseg_request_bytes_total", (("route", "/segment"),))] == 2000
    assert samples[("liverseg_model_switches_total", (("role", "champion"),))] == 1
    assert samples[("liverseg_queue_depth", ())] == 6  # summed over the workers
    assert samples[("liverseg_follow_degraded", (("role", "champion"),))] == 1  # the largest
    info = {k[1]: v for k, v in samples.items() if k[0] == "liverseg_model_info"}
    assert info[(("alias", "champion"), ("name", "liver-unet"), ("version", "2"))] == 1
    assert info[(("alias", "champion"), ("name", "liver-unet"), ("version", "1"))] == 1  # the first worker's
