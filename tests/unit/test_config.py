import pytest
from pydantic import Field

from vigorl_core.config import ConfigError, StageConfig, parse_config


class Inner(StageConfig):
    offset: int = Field(10, description="half window")
    label: str = Field("a", description="a nested string")
    flag: bool = Field(False, description="a nested bool")


class Cfg(StageConfig):
    """A test config."""

    name: str = Field("x", description="run name")
    n: int = Field(1, ge=1)
    note: str | None = Field(None, description="optional text")
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


def test_a_bare_boolean_flag_means_true():
    assert parse_config(Cfg, ["--inner.flag"]).inner.flag is True
    assert parse_config(Cfg, ["--inner.flag", "--n", "2"]).inner == Inner(flag=True)
    assert parse_config(Cfg, ["--inner.flag", "false"]).inner.flag is False
    with pytest.raises(ConfigError, match="--name needs a value"):
        parse_config(Cfg, ["--name", "--n", "2"])  # only booleans stand alone


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "--inner.offset" in out and "half window" in out and "A test config." in out


@pytest.mark.parametrize("argv, expected", [
    (["--name", "2024"], {"name": "2024"}),
    (["--name=off"], {"name": "off"}),
    (["--name", "1.5"], {"name": "1.5"}),
    (["--name", "null"], {"name": "null"}),  # a str field has no null: the text itself
    (["--inner.label", "yes"], {"inner.label": "yes"}),
    (["--note", "2024"], {"note": "2024"}),
    (["--note", "none"], {"note": "none"}),
    (["--note", "null"], {"note": None}),
    (["--note", "~"], {"note": None}),
    (["--n", "4", "--inner.flag", "off", "--inner.offset", "8"], {"n": 4, "inner.flag": False, "inner.offset": 8}),
])
def test_string_fields_take_the_text_verbatim(argv, expected):
    """YAML would read `2024` as an int and `off` as a bool; a str field must get the text as written,
    other fields still parse as YAML scalars."""
    cfg = parse_config(Cfg, argv)
    for dotted, value in expected.items():
        got = cfg
        for key in dotted.split("."):
            got = getattr(got, key)
        assert got == value, dotted


def test_config_files_and_overrides_merge_deeply(tmp_path):
    base, extra = tmp_path / "base.yaml", tmp_path / "extra.yaml"
    base.write_text("name: base\nn: 2\ninner:\n  offset: 5\n  label: keep\n")
    extra.write_text("n: 3\ninner:\n  flag: true\n")
    cfg = parse_config(Cfg, ["--config", str(base), "--config", str(extra), "--inner.offset", "6"])
    assert (cfg.name, cfg.n) == ("base", 3)
    assert (cfg.inner.offset, cfg.inner.label, cfg.inner.flag) == (6, "keep", True)
