"""The CLI maps subcommands to functions; bad input is a clear message, not a traceback."""

from typer.testing import CliRunner

from moesaic.cli import app

runner = CliRunner()


def test_info_prints_total_and_active():
    res = runner.invoke(app, ["info", "--preset", "tiny", "--seq-len", "8"])
    assert res.exit_code == 0, res.output
    assert "active params per token" in res.output and "total params" in res.output


def test_info_bad_preset_is_clear():
    res = runner.invoke(app, ["info", "--preset", "nope"])
    assert res.exit_code == 2
    assert "available presets" in res.output
    assert "Traceback" not in res.output
