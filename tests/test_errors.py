"""usnet's own errors share one base class; the command line reports only those (and OSError,
argument errors) as one line, and lets every real failure keep its traceback."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import usnet
from usnet import cli
from usnet.errors import UsnetError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name",
    ["ConversionError", "UncalibratedWidthError", "VerificationError"],
)
def test_public_errors_share_the_base_class_and_keep_their_builtin_type(name):
    error = getattr(usnet, name)
    assert issubclass(error, UsnetError)
    assert issubclass(error, ValueError if name == "ConversionError" else RuntimeError)


def test_library_errors_are_usnet_errors_and_value_errors():
    with pytest.raises(UsnetError) as info:
        usnet.models.create_model("us_vgg")
    assert isinstance(info.value, ValueError)
    from usnet.train.config import ConfigError

    assert issubclass(ConfigError, UsnetError) and issubclass(ConfigError, ValueError)
    with pytest.raises(UsnetError, match="outside the width range"):
        usnet.set_width(usnet.models.us_convnet(), 0.1)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("a bug"),
        TypeError("a bug"),
        KeyError("a bug"),
    ],
)
def test_real_failures_are_not_turned_into_one_line_messages(monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_profile", fail)
    with pytest.raises(type(error)):
        cli.main(["profile", "us_convnet"])


def test_usnet_and_os_errors_are_one_line_with_exit_2(monkeypatch, capsys):
    def fail(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/model.pt")

    monkeypatch.setattr(cli, "cmd_profile", fail)
    assert cli.main(["profile", "us_convnet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usnet: error: no space left on device (/data/run/model.pt); free some space: "
                   "no existing file was changed"]  # fmt: skip
    assert "Errno" not in err[0]


def test_interrupt_says_how_to_continue(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["train", "c.yaml", "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err.strip() == (
        f"usnet: interrupted; continue with: usnet train --resume --out {tmp_path / 'r'}"
    )


def test_a_failure_exits_with_a_traceback_and_status_1():
    # A zoo model whose builder crashes (an internal bug): not exit 2, not one line.
    code = (
        "import sys, usnet.models.zoo as zoo\n"
        "def broken(**kw): raise RuntimeError('internal bug')\n"
        "zoo._BUILDERS['us_convnet'] = broken  # the registry itself refuses a second us_convnet\n"
        "from usnet.cli import main\n"
        "sys.exit(main(['profile', 'us_convnet']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: internal bug" in result.stderr
