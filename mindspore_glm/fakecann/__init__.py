"""Stand-ins for the CANN libraries MindSpore's Ascend plugin loads, so that a DryRun compile
(``MS_SIMULATION_LEVEL`` 0 or 1: compile, and per-rank memory statistics) runs on a machine without CANN
or an NPU. Used by :mod:`mindspore_glm.dryrun`; on a machine with CANN installed the installed libraries
are used instead (:func:`cann_env`).

What is built (with gcc, once, into a cache folder): the 15 libraries of ``libnames.txt``, each exporting
every symbol of ``symbols.txt`` (the CANN symbols MindSpore 2.9's Ascend plugin resolves) as a function
that returns 0, plus ``overrides.c``: ``ge::OperatorFactory::CreateOperator`` returns an empty
``ge::Operator`` (MindSpore builds old-style operators such as Split, StridedSlice through it), and a
two-line ``hccl.sys_version`` Python module, which ``mindspore.communication.init()`` imports. The folder
holding them has ``cann/latest`` in its path: MindSpore derives the CANN root from where ``aclrtMalloc``
lives and looks for ``latest`` or ``cann`` in it. Simulation levels 2 and 3 run kernels and need a device.

    python -m mindspore_glm.fakecann            # build (if needed) and print the folder
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Optional

__all__ = ["FakeCannError", "build", "cache_root", "installed_cann", "cann_env"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("overrides.c", "symbols.txt", "libnames.txt")


class FakeCannError(RuntimeError):
    """The stand-ins cannot be built; the message is one line."""


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


def cache_root() -> str:
    """``$GLM2_CACHE_DIR``, else ``$XDG_CACHE_HOME/glm2-ascend``, else ``~/.cache/glm2-ascend``."""
    if os.environ.get("GLM2_CACHE_DIR"):
        return os.environ["GLM2_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm2-ascend")


def _stub_asm(symbols, overridden) -> str:
    out = [".text"]
    for s in symbols:
        if s in overridden:
            continue
        out += [f".globl {s}", f".type {s},@function", f"{s}:", "  xorl %eax,%eax", "  ret", f".size {s},.-{s}"]
    out.append('.section .note.GNU-stack,"",@progbits')
    return "\n".join(out) + "\n"


def build(root: Optional[str] = None) -> str:
    """Build the stand-ins (if not already in the cache) and return their root: ``<root>/lib64`` holds the
    libraries, ``<root>/python`` the ``hccl`` module. The cache folder is keyed by a hash of the sources."""
    sources = {n: _read(n) for n in _SOURCES}
    key = hashlib.sha256("\0".join(sources[n] for n in _SOURCES).encode()).hexdigest()[:12]
    dest = os.path.join(root or cache_root(), f"fakecann-{key}", "cann", "latest")
    names = sources["libnames.txt"].split()
    if all(os.path.isfile(os.path.join(dest, "lib64", n)) for n in names):
        return dest
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        raise FakeCannError("the DryRun compile needs gcc to build its stand-in CANN libraries (apt-get install gcc), "
                            "or an installed CANN (source its set_env.sh)")
    symbols = [s.strip() for s in sources["symbols.txt"].splitlines() if s.strip()]
    overridden = set(re.findall(r"\.set ([A-Za-z0-9_]+)", sources["overrides.c"]))
    os.makedirs(os.path.dirname(os.path.dirname(dest)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(os.path.dirname(dest)))
    try:
        lib = os.path.join(tmp, "latest", "lib64")
        os.makedirs(lib)
        asm = os.path.join(tmp, "stub.S")
        with open(asm, "w") as f:
            f.write(_stub_asm(symbols, overridden))
        for n in names:
            r = subprocess.run([gcc, "-O1", "-shared", "-fPIC", "-o", os.path.join(lib, n), asm,
                                os.path.join(_HERE, "overrides.c"), f"-Wl,-soname,{n}"],
                               capture_output=True, text=True)
            if r.returncode:
                msg = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise FakeCannError(f"gcc failed building the stand-in {n}: {msg}")
        py = os.path.join(tmp, "latest", "python", "hccl")
        os.makedirs(py)
        open(os.path.join(py, "__init__.py"), "w").close()
        with open(os.path.join(py, "sys_version.py"), "w") as f:
            f.write('__sys_version__ = "8.5.0"\n')
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(os.path.join(tmp, "latest"), dest)       # atomic: a concurrent build may have won
        except OSError:
            if not os.path.isfile(os.path.join(dest, "lib64", names[0])):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def installed_cann() -> Optional[str]:
    """The installed CANN's root (``$ASCEND_HOME_PATH`` or ``/usr/local/Ascend/ascend-toolkit/latest``), or None."""
    for root in (os.environ.get("ASCEND_HOME_PATH"), "/usr/local/Ascend/ascend-toolkit/latest"):
        if root and os.path.isfile(os.path.join(root, "lib64", "libascendcl.so")):
            return root
    return None


def cann_env(env: Optional[Dict[str, str]] = None, use_installed: bool = True) -> Dict[str, str]:
    """``env`` (default ``os.environ``) for a DryRun child process: unchanged where CANN is installed
    (``use_installed``), else with the stand-ins first on ``LD_LIBRARY_PATH`` and ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    if use_installed and installed_cann():
        return env
    root = build()
    for var, path in (("LD_LIBRARY_PATH", os.path.join(root, "lib64")), ("PYTHONPATH", os.path.join(root, "python"))):
        env[var] = path + (os.pathsep + env[var] if env.get(var) else "")
    return env


def main() -> int:
    try:
        print(build())
    except FakeCannError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
