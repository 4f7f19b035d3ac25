"""Optional dependencies: a missing one is one line naming the extra; `tinyswin --version`."""

from __future__ import annotations

import pytest

from tinyswin.cli import main
from tinyswin.extras import MissingExtraError, require
from tinyswin.version import __version__


def test_a_missing_optional_module_names_the_extra() -> None:
    with pytest.raises(MissingExtraError) as info:
        require("tinyswin_no_such_module", "export", "ONNX export")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'tinyswin[export]'" in message
    assert message.startswith("ONNX export needs tinyswin_no_such_module")


def test_a_present_optional_module_is_returned() -> None:
    assert require("json", "export", "x").dumps([1]) == "[1]"


def test_the_missing_extra_is_one_cli_line(monkeypatch, capsys) -> None:
    def fail(_args) -> int:
        require("tinyswin_no_such_module", "export", "ONNX export")
        return 0

    monkeypatch.setattr("tinyswin.cli.cmd_info", fail)  # build_parser binds the handler it finds
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "tinyswin info: error: ONNX export needs tinyswin_no_such_module, which is not installed: "
        "pip install 'tinyswin[export]'"
    ]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tinyswin {__version__}"
