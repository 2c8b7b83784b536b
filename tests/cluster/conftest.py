"""The integration suite against a real SLURM (README "Sweeps on a cluster"): collected only when
asked for by path, so a plain `pytest -q` on a machine without SLURM stays green and fast:

    tests/cluster/slurm.sh up && SLURM_CONF=/tmp/adashift-slurm/slurm.conf pytest -q tests/cluster
    tests/cluster/slurm.sh down
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    asked = any(HERE == p or HERE in p.parents
                for p in (Path(str(a).split("::")[0]).resolve() for a in config.args))
    return None if asked else True
