"""The README's test command and the generated config reference (docs/CONFIG.md) match the
code."""
from helpers.paths import ROOT

from slope_megatron.config import config_reference

README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    assert config_reference() in (ROOT / "docs" / "CONFIG.md").read_text(), \
        "regenerate the config table in docs/CONFIG.md (python launch/pretrain.py --help-config)"


def test_ci_runs_the_readme_test_command():
    assert "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("launch/demo.sh", "tests/run.sh"):
        assert (ROOT / script).is_file()
