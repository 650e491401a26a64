"""HCCL rank tables for Ascend clusters, in the shape mindformers' tools write them.

- ``python hccl/hccl_tools.py --device_num "[0,8)"``: this node's table (``hccl_tools.py``);
- ``python hccl/merge_hccl.py A.json B.json``: the cluster's table from per-node tables (``merge_hccl.py``);
- ``python -m hccl.validate TABLE.json --device-range "[0,8)" [--rank-size N]``: the check
  ``scripts/run_distribute.sh`` runs before it starts anything (``validate.py``).

Shared pieces (device-range syntax, IPv4 check, atomic JSON writing) live in ``rank_table.py``.
"""

# The CANN toolkit ships a Python package of the same name (``hccl.sys_version``, which
# ``mindspore.communication.init()`` imports on Ascend): its modules stay importable beside ours.
import pkgutil as _pkgutil

__path__ = _pkgutil.extend_path(__path__, __name__)
