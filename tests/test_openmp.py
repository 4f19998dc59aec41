"""The OpenMP wait setting `mepf` starts with (mepf_core/openmp.py): a bounded spin unless the user set one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mepf_core.openmp import SPIN_COUNT, bounded_spin_env

REPO = Path(__file__).resolve().parents[1]


def test_unset_environment_gets_the_bounded_spin():
    env = {"PATH": "/usr/bin"}
    assert bounded_spin_env(env) is env
    assert env == {"PATH": "/usr/bin", "GOMP_SPINCOUNT": "10000"}
    assert SPIN_COUNT == "10000"


@pytest.mark.parametrize("own", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "active"},
                                 {"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "INFINITE"}])
def test_a_users_own_wait_setting_is_kept(own):
    env = dict(own)
    bounded_spin_env(env)
    assert env == own


@pytest.mark.parametrize("own, expected", [({}, "10000 None"), ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
                                           ({"GOMP_SPINCOUNT": "500"}, "500 None")])
def test_the_cli_sets_it_before_torch_loads(own, expected):
    """Importing the CLI (what `mepf` runs) sets the wait before torch is imported (libgomp reads it at load)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(own, PYTHONPATH=str(REPO))
    code = ("import sys, os, flows.cli; "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [*expected.split(), "False"]
