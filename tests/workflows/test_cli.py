import subprocess
import sys
from pathlib import Path

from workflows.cli import WORKFLOWS, main


def test_help_lists_every_workflow(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in WORKFLOWS)


def test_unknown_workflow_is_an_error(capsys):
    assert main(["teleport"]) == 2
    assert "unknown workflow 'teleport'" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "anytoken"
    done = subprocess.run([str(script), "demo-data", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--audio-per-digit" in done.stdout
    done = subprocess.run([sys.executable, "-m", "workflows.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "demo-data" in done.stdout
