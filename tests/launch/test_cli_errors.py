"""Bad command-line values end with ``tokenmill ...: error: argument --X: ...`` and exit code 2,
never a traceback (argparse checks them through ``flags.bounded``)."""

from __future__ import annotations

import pytest

from tokenmill.launch.cli import main

CASES = [
    (["serve", "--port", "70000"], "--port: must be in [1, 65535], got 70000"),
    (["serve", "--port", "abc"], "--port: 'abc' is not a valid int"),
    (["serve", "--block-size", "0"], "--block-size: must be in [1, inf), got 0"),
    (["serve", "--num-blocks", "0"], "--num-blocks: must be in [1, inf), got 0"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs: must be in [1, inf), got 0"),
    (["serve", "--max-num-batched-tokens", "-3"], "--max-num-batched-tokens: must be in [1, inf)"),
    (["serve", "--watermark", "1.5"], "--watermark: must be in [0, 1), got 1.5"),
    (["serve", "--watermark", "1"], "--watermark: must be in [0, 1), got 1"),
    (["serve", "--workers", "-1"], "--workers: must be in [0, inf), got -1"),
    (["serve", "--context-length", "0"], "--context-length: must be in [1, inf), got 0"),
    (["serve", "--mocker-speedup", "0"], "--mocker-speedup: must be in (0, inf), got 0"),
    (["serve", "--request-timeout", "-1"], "--request-timeout: must be in (0, inf), got -1"),
    (["worker", "--nats", "n", "--drain-timeout", "-1"], "--drain-timeout: must be in [0, inf)"),
    (["router", "--nats", "n", "--block-size", "0"], "--block-size: must be in [1, inf), got 0"),
    (["replay", "--trace", "t", "--watermark", "2"], "--watermark: must be in [0, 1), got 2"),
    (["--log-level", "BOGUS", "serve"], "--log-level: invalid choice: 'BOGUS'"),
    (["serve", "--max-tokens-default", "0"], "--max-tokens-default: must be in [1, inf), got 0"),
]


@pytest.mark.parametrize(("argv", "message"), CASES)
def test_bad_values_exit_2_with_the_flag_named(argv: list[str], message: str, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "error: argument" in err
    assert "Traceback" not in err


def test_log_level_is_case_insensitive():
    from tokenmill.launch.cli import build_parser

    assert build_parser().parse_args(["--log-level", "debug", "serve"]).log_level == "DEBUG"
