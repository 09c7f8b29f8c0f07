"""``moesim dashboard`` starts ``streamlit run`` on the installed dashboard/app.py, on localhost
unless told otherwise."""

from __future__ import annotations

import subprocess

from moesim.cli import main


def test_dashboard_command_defaults_to_localhost(monkeypatch):
    seen = {}

    def fake_call(cmd, *a, **k):
        seen["cmd"] = cmd
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    assert main(["dashboard"]) == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("dashboard/app.py")
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert main(["dashboard", "--port", "8600", "--host", "0.0.0.0"]) == 0
    assert seen["cmd"][seen["cmd"].index("--server.port") + 1] == "8600"
    assert seen["cmd"][seen["cmd"].index("--server.address") + 1] == "0.0.0.0"
