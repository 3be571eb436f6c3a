"""The hub probe: offline for this process only, never guessed behind a proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os
from qa_dist.runtime import hub
offline = hub.go_offline_unless_reachable()
import huggingface_hub.constants as c
print(json.dumps({"offline": offline, "client": c.HF_HUB_OFFLINE, "env": os.environ.get("HF_HUB_OFFLINE")}))
"""


def _probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if "OFFLINE" not in k and "PROXY" not in k.upper()}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_an_unreachable_hub_makes_this_process_offline_and_no_other():
    got = _probe(HF_ENDPOINT="http://127.0.0.1:9")  # a closed port: refused at once
    assert got == {"offline": True, "client": True, "env": None}  # children and batch jobs decide for themselves


def test_behind_a_proxy_nothing_is_guessed():
    got = _probe(HF_ENDPOINT="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    assert got == {"offline": False, "client": False, "env": None}


def test_the_users_offline_switches_are_honoured():
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert _probe(**{name: "1"})["offline"] is True
