"""The probe's command line: its forms parse, and a user's mistake is one line with exit code 2."""

from __future__ import annotations

import pytest

from galip.world.probe import main, parse


def test_the_documented_forms_parse():
    assert parse(["--data", "shapes_demo"]).data == "shapes_demo"
    args = parse(["path/clip.pt", "300"])
    assert (args.clip, args.n, args.generator) == ("path/clip.pt", 300, None)
    args = parse(["--data", "shapes_demo", "--generator", "g.safetensors", "64"])
    assert (args.generator, args.n, args.clip) == ("g.safetensors", 64, None)
    assert parse(["--judge-shapes", "g.safetensors"]).n is None


@pytest.mark.parametrize(
    "argv",
    [["--help-me"], ["--generator", "g.safetensors", "many"], ["--generator", "a", "--discriminator", "b"]],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["missing.pt"], ["--generator", "missing.safetensors", "4"]])
def test_a_missing_file_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("galip: ") and "missing" in err[0]
