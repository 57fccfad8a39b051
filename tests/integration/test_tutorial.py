"""docs/tutorial.md, run as a reader would: every file it shows is written, every `$` command
it shows is run in order (a real `cortex` process against a real server), with the job ids
the commands printed put in place of `<job id>` and `<report job id>`. What the tutorial says
happens is checked: the exit codes, the failed batch, the chained report's line.

Not run: the install and `cortex serve` block of step 1 (the test's own server stands in)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cortex.client import Client
from helpers import Server, start_server, stop_server, wait_for

TUTORIAL = Path(__file__).parents[2] / "docs" / "tutorial.md"
OUTPUT = "/tmp/cortex-tutorial"


def steps(text: str) -> list[tuple[str, str, str]]:
    """("file", path, content) and ("run", command, "") in the order the tutorial has them."""
    found: list[tuple[str, str, str]] = []
    pattern = re.compile(
        r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S
    )
    for match in pattern.finditer(text):
        if match["file"]:
            found.append(("file", match["file"], match["body"]))
        elif match["lang"] == "console":
            for line in match["body"].splitlines():
                if line.startswith("$ "):
                    found.append(("run", line[2:], ""))
    return found


def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    text = TUTORIAL.read_text()
    out = tmp_path / "results"
    server: Server = start_server(tmp_path / "server")
    env = {**os.environ, "CORTEX_URL": server.url, "COLUMNS": "200"}
    ids: dict[str, str] = {}
    said: dict[str, str] = {}
    try:
        for kind, what, body in steps(text.replace(OUTPUT, str(out))):
            if kind == "file":
                target = tmp_path / what
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(body)
                continue
            command = what
            for placeholder, value in ids.items():
                command = command.replace(placeholder, value)
            assert "<" not in command, f"no value yet for a placeholder in {command!r}"
            argv = shlex.split(command)
            if argv[0] == "cortex":
                argv = [sys.executable, "-m", "cortex.cli", *argv[1:]]
            done = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )
            said[what] = done.stdout + done.stderr
            # The tutorial says --wait exits 1 here: the job completes with failures.
            expected = 1 if "--wait" in argv else 0
            assert done.returncode == expected, (command, done.stdout, done.stderr)
            submitted = re.search(r"submitted job (\w+)", done.stdout)
            if submitted and "<job id>" not in ids:
                ids["<job id>"] = submitted.group(1)
            if argv[-1] == "report" and "get" in argv:
                with Client(server.url) as client:
                    ids["<report job id>"] = wait_for(
                        lambda c=client: (
                            c.list_jobs("report") and c.list_jobs("report")[0]["job_id"]
                        ),
                        30,
                        "the chained report job",
                    )
    finally:
        stop_server(server)

    job = ids["<job id>"]
    assert "created sentiment (BatchAPI)" in said["cortex deploy sentiment/cortex.yaml"]
    assert "completed with failures" in said["cortex submit sentiment reviews.json --wait"]
    assert "TypeError: a review must be text, not 42" in said["cortex failed sentiment <job id>"]
    logs = said["cortex logs sentiment <job id>"]
    assert "scored 2 reviews" in logs and "submitted the report: job" in logs
    assert len(said[f"ls {out}/<job id>"].split()) == 2  # two batches succeeded
    assert "2 of 4 reviews were positive" in said["cortex logs report <report job id>"]
    assert f"failed batches of job {job}" in said["cortex retry sentiment <job id>"]
