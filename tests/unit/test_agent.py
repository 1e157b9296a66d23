"""Guest agent pieces that run the same on the host: IMDSv2, user data, cgroups."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nightshift import agent
from nightshift.runconfig import RunConfig

IMAGE = "10.0.2.2:5000/nightshift/example:latest"


class FakeImds(BaseHTTPRequestHandler):
    """IMDSv2 as EC2 serves it: a PUT for a token, GETs that must carry it."""

    token = "t0ken"
    documents: dict = {}

    def do_PUT(self):
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self.send_error(400)
            return
        self._send(200, self.token.encode())

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self.send_error(401)
            return
        body = self.documents.get(self.path)
        if body is None:
            self.send_error(404)
        else:
            self._send(200, body)

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prepare_reads_user_data_over_imdsv2(imds, tmp_path):
    """The config unit fetches user data with a session token and stores it checked."""
    server, endpoint = imds
    config = RunConfig(image=IMAGE, run_id="r1", environment={"ROWS": "5"})
    FakeImds.documents = {"/latest/user-data": config.to_user_data().encode()}
    settings = agent.Settings(source="imds", imds_endpoint=endpoint, state_dir=tmp_path)
    assert agent.prepare(settings) == 0
    stored = RunConfig.from_user_data((tmp_path / "run.json").read_text())
    assert stored == config
    assert not (tmp_path / "maintenance").exists()


def test_prepare_marks_maintenance_from_user_data(imds, tmp_path):
    server, endpoint = imds
    config = RunConfig(image=IMAGE, mode="maintenance")
    FakeImds.documents = {"/latest/user-data": config.to_user_data().encode()}
    settings = agent.Settings(source="imds", imds_endpoint=endpoint, state_dir=tmp_path)
    assert agent.prepare(settings) == 0
    assert (tmp_path / "maintenance").exists()


def test_bad_user_data_leaves_a_config_error_for_the_report(imds, tmp_path):
    """A wrong value still ends in a report: run() records config-error."""
    server, endpoint = imds
    FakeImds.documents = {
        "/latest/user-data": json.dumps({"image": IMAGE, "mode": "x"}).encode()
    }
    settings = agent.Settings(source="imds", imds_endpoint=endpoint, state_dir=tmp_path)
    assert agent.prepare(settings) == 1
    assert "mode" in (tmp_path / "config-error").read_text()
    assert agent.run(settings) == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["outcome"] == "config-error"
    assert result["reason"].startswith("mode: 'x'")


def test_report_without_a_record_says_what_systemd_saw(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SERVICE_RESULT", "signal")
    monkeypatch.setenv("EXIT_STATUS", "KILL")
    settings = agent.Settings(state_dir=tmp_path, record_dir=tmp_path / "lib")
    agent.report(settings)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(agent.RESULT_MARK + " ")
    record = json.loads(line[len(agent.RESULT_MARK) :])
    assert record["outcome"] == "agent-failure"
    assert "signal" in record["reason"] and "KILL" in record["reason"]
    assert json.loads((tmp_path / "lib" / "last-result.json").read_text()) == record


def test_cgroup_usage_reads_the_slice(tmp_path):
    slice_dir = tmp_path / agent.SLICE
    slice_dir.mkdir()
    (slice_dir / "memory.peak").write_text("73400320\n")
    (slice_dir / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert agent.cgroup_usage(tmp_path) == (73400320, 2.5)


def test_cgroup_usage_missing_is_unknown(tmp_path):
    assert agent.cgroup_usage(tmp_path) == (None, None)


def test_run_arguments_keep_values_off_the_command_line():
    """Environment values go through the process environment, not argv."""
    config = RunConfig(
        image=IMAGE, environment={"TOKENISH": "s3cret"}, command=("a", "b")
    )
    args = agent.run_arguments(config)
    assert "s3cret" not in " ".join(args)
    assert args[-3:] == [IMAGE, "a", "b"]
    assert args[args.index("--env") : args.index("--env") + 2] == ["--env", "TOKENISH"]
    assert "--name" in args and agent.CONTAINER in args
    # An init passes the stop's SIGTERM to a job that runs no handler.
    assert "--init" in args


@pytest.mark.parametrize(
    "line",
    [
        'NIGHTSHIFT-RESULT {"outcome": "success"}',
        '[  110.811379] python3[409]: NIGHTSHIFT-RESULT {"outcome": "success"}',
        '[   38.8] systemd-run[1]: NIGHTSHIFT-RESULT {"outcome": "success"}',
    ],
)
def test_console_lines_are_read_with_or_without_journald_prefix(line):
    """journal+console output carries a kernel-style prefix; the marks still count."""
    from nightshift.localrun import console_text

    assert console_text(line) == 'NIGHTSHIFT-RESULT {"outcome": "success"}'
