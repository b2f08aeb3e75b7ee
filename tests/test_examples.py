"""Examples run as a user runs them: ``python examples/NAME.py``."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def run(name, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)


def test_xor_learns_and_prints_the_truth_table():
    result = run("xor.py")
    assert result.returncode == 0, result.stderr
    assert "XOR learned" in result.stdout
    rows = [line.split("|") for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0].split(), int(r[1]), int(r[3])) for r in rows] == [
        (["0", "0"], 0, 0), (["0", "1"], 1, 1), (["1", "0"], 1, 1), (["1", "1"], 0, 0)]
