"""The README's commands and config reference match the code."""

from slope_megatron.config import config_reference

from helpers.paths import ROOT
README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    assert config_reference() in README, "regenerate the README's config table"


def test_ci_runs_the_readme_test_command():
    assert "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("launch/demo.sh", "tests/run.sh"):
        assert (ROOT / script).is_file()
