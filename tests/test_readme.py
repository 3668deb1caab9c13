"""The README's two commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```(?:bash|sh)\n(.+?)\n```", text, flags=re.M)


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    tests = [c for c in commands if "pytest" in c]
    assert tests, "README.md must show the test command in a bash block"
    assert tests[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_leads_with_the_main_job_and_the_tests():
    first_two = _readme_commands()[:2]
    assert "llmcore" in first_two[0] and "setup.sh" in first_two[0]
    assert "pytest" in first_two[1] and "setup.sh" in first_two[1]
