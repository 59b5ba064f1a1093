from async_rl import cli


def test_usage_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words, _, _ in cli.SUBCOMMANDS:
        assert " ".join(words) in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["nonsense"]) == 2
    assert "usage" in capsys.readouterr().err
