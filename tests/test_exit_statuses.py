"""One table of exit statuses (everest.errors): what every command returns and every launcher says it means."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from everest.errors import EXIT_IO, EXIT_STATUSES, describe_exit_status

LIB = Path(__file__).resolve().parents[1] / "cluster" / "lib.sh"


@pytest.mark.parametrize("status", [*EXIT_STATUSES, 77, 128 + 6])
def test_batch_scripts_describe_every_status_from_the_one_table(status):
    script = f'source "{LIB}"; EVEREST_PY="{sys.executable}"; everest_train_status_meaning {status}'
    said = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).stdout.strip()
    assert said == describe_exit_status(status)


def test_every_status_has_a_meaning_and_disk_full_is_not_a_crash():
    assert "disk full" in describe_exit_status(EXIT_IO) and "crashed" not in describe_exit_status(EXIT_IO)
    assert describe_exit_status(77) == "crashed (exit status 77)"
    assert describe_exit_status(128 + 6) == "killed by signal 6: resubmit to resume from the last epoch checkpoint"
    assert all(text and text[0].islower() for text in EXIT_STATUSES.values())
