import pytest
from pydantic import Field

from vigorl_core.config import ConfigError, StageConfig, parse_config


class Inner(StageConfig):
    offset: int = Field(10, description="half window")


class Cfg(StageConfig):
    """A test config."""

    name: str = Field("x", description="run name")
    n: int = Field(1, ge=1)
    inner: Inner = Inner()


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\nn: 3\ninner:\n  offset: 5\n")
    cfg = parse_config(Cfg, ["--config", str(path), "--n=4", "--inner.offset", "7"])
    assert (cfg.name, cfg.n, cfg.inner.offset) == ("from_yaml", 4, 7)


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "bogus: Extra inputs are not permitted"),
    (["--inner.bogus=1"], "inner.bogus"),
    (["--n", "0"], "n: Input should be greater than or equal to 1 (got 0)"),
    (["--n"], "--n needs a value"),
    (["positional"], "unexpected argument 'positional'"),
    (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_bad_input_names_the_field(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(Cfg, argv)
    assert message in str(err.value)


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "--inner.offset" in out and "half window" in out and "A test config." in out
