"""The command line's profile command and its error reporting (train/eval/calibrate: test_trainer)."""

import json

import pytest

from usnet.cli import main


def test_profile_table_and_json(capsys):
    assert main(["profile", "us_mobilenet_v2", "--widths", "0.35,1.0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["width"] for r in rows] == [0.35, 1.0]
    assert [round(r["macs"] / 1e6, 1) for r in rows] == [59.3, 300.8]
    assert rows[1]["flops"] == 2 * rows[1]["macs"] and rows[1]["params"] == 3504872
    assert (
        main(["profile", "us_convnet", "--widths", "0.25:1.0:0.25", "--input-size", "1,1,28,28"])
        == 0
    )
    out = capsys.readouterr().out
    assert "1x1x28x28" in out and len(out.strip().splitlines()) == 2 + 4


def test_profile_of_a_checkpoint(tmp_path, capsys):
    import usnet

    path = usnet.save(usnet.models.us_convnet(), tmp_path / "m.pt")
    assert main(["profile", str(path), "--widths", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["params"] == 278890


def test_a_file_named_like_a_zoo_model_wins_in_every_command(tmp_path, monkeypatch, capsys):
    import usnet

    usnet.save(usnet.models.us_convnet(num_classes=3), tmp_path / "us_convnet")
    monkeypatch.chdir(tmp_path)
    assert (
        main(["profile", "us_convnet", "--widths", "1.0", "--input-size", "1,1,28,28", "--json"])
        == 0
    )
    params = json.loads(capsys.readouterr().out)[0]["params"]
    assert params == 278890 - 7 * (128 + 1)  # the file's 3-class head, not the zoo's 10 classes
    assert main(["select", "us_convnet", "--max-params", str(params), "--input-size", "1,1,28,28",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["params"] == params


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "resnet1000"], "neither a zoo model"),
        (["profile", "us_resnet18", "--widths", "0.1"], "outside the width range [0.25, 1.0]"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usnet: error: ") and message in err[0]


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "us_resnet18", "--widths", "a:b"])
    assert exit_info.value.code == 2
    assert "invalid widths 'a:b'" in capsys.readouterr().err
