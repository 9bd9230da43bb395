"""Every Triton kernel compiles for an H100/H200 (sm_90) at the widths and flags the ops really launch, no GPU needed.

CI only runs the kernels under the Triton interpreter, which accepts code a real compile rejects and says nothing of
registers. Here `bench/aot.py` records the launches the custom ops make (BLOCK, num_warps and flags chosen by
the launchers themselves), compiles each distinct one to a cubin with the ptxas in the triton wheel, and reads the
cubin's registers and spills. It runs in a subprocess because TRITON_INTERPRET=1 (set by conftest for CPU sessions)
turns @triton.jit into interpreter objects at import. The compile cache is a fresh temporary directory, so every run
really compiles (~13 s on 2 idle cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

AOT = Path(__file__).resolve().parents[1] / "bench" / "aot.py"
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OPS = {
    "_cross_entropy_kernel": {"cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_inplace",
                              "linear_cross_entropy_sum", "linear_cross_entropy_rows",
                              "linear_cross_entropy_rows_bwd"},
    "_rms_norm_fwd_kernel": {"rms_norm_fwd", "add_rms_norm_fwd"},
    "_rms_norm_bwd_kernel": {"rms_norm_bwd", "add_rms_norm_bwd"},
}
# Spills ptxas reports today (bytes per thread; triton 3.9, sm_90), allowed up to these bounds and no further. All are
# the RMSNorm backward at hidden 16384, which holds several whole fp32 rows per program (weight, the dweight
# accumulator, dy, s): more than the 64 registers a 1024-thread program may have. Every other launch must not spill
# at all (hidden 4100 spilled 32-56 bytes until the kernels moved to [rows, BLOCK] tiles).
KNOWN_SPILLS = {
    ("rms_norm_bwd", "bfloat16 hidden=16384"): 56,
    ("add_rms_norm_bwd", "bfloat16 hidden=16384"): 72,
    ("rms_norm_bwd", "float32 hidden=16384"): 80,
    ("add_rms_norm_bwd", "float32 hidden=16384"): 104,
}

pytestmark = pytest.mark.skipif(
    not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
    reason="this triton wheel ships no ptxas/cuobjdump to compile for NVIDIA GPUs",
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default today; set to silence triton's warning
    result = subprocess.run([sys.executable, str(AOT), "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"ahead-of-time compile for sm_90 failed:\n{result.stderr[-6000:]}"
    return json.loads(result.stdout)


def _spills(record) -> dict:
    return {(op, record["config"]): record["spill_bytes"] for op in record["ops"]}


def test_every_op_launch_is_compiled(compiled):
    ops_seen = {}
    for record in compiled:
        ops_seen.setdefault(record["kernel"], set()).update(record["ops"])
    assert ops_seen == OPS
    configs = {(op, r["config"]) for r in compiled for op in r["ops"]}
    for dtype in ("bfloat16", "float32"):
        for hidden in (128, 2048, 4096, 4100, 8192, 16384):
            for op in OPS["_rms_norm_fwd_kernel"] | OPS["_rms_norm_bwd_kernel"]:
                assert (op, f"{dtype} hidden={hidden}") in configs
        for op in OPS["_cross_entropy_kernel"]:
            assert sum(config.startswith(f"{dtype} V=128256") for o, config in configs if o == op) == 2


def test_each_compile_produced_a_cubin(compiled):
    for record in compiled:
        assert record["has_cubin"], record
        assert 0 < record["registers"] <= 255, record
        assert record["static_shared_bytes"] + record["shared_bytes"] <= 227 * 1024, record  # sm_90 per-block max


def test_no_register_spills_beyond_the_known_ones(compiled):
    for record in compiled:
        for key, spill_bytes in _spills(record).items():
            assert spill_bytes <= KNOWN_SPILLS.get(key, 0), f"{key} spills {spill_bytes} bytes per thread: {record}"


def test_launches_cover_their_rows_and_fit_an_sm(compiled):
    """Facts a GPU enforces, checked on the compiled binaries: a program's threads x registers fit one SM's register
    file (65536 on sm_90; more compiles fine and fails at launch), every thread has work, BLOCK is a power of two, and
    an RMSNorm tile holds whole rows (BLOCK covers the width with less than half masked)."""
    for record in compiled:
        c, warps = record["constexprs"], record["num_warps"]
        block = c["BLOCK"]
        assert warps in (1, 2, 4, 8, 16, 32), record
        assert record["registers"] * 32 * warps <= 65536, f"{record['registers']} registers x {warps} warps: {record}"
        assert block & (block - 1) == 0, record
        if record["kernel"] == "_cross_entropy_kernel":
            assert 32 * warps <= block <= 128256, record
        else:
            hidden = int(record["config"].rsplit("=", 1)[1])
            assert hidden <= block < 2 * hidden, record
            assert 32 * warps <= block * c["ROWS"], record


def test_flags_match_the_ops(compiled):
    """The flag combinations the ops use: forward (loss only), backward (gradient from saved lse, scaled rows),
    fused linear forward with and without the gradient sweep, and residual / dsum variants of RMSNorm."""
    flags = {}
    for record in compiled:
        c = record["constexprs"]
        for op in record["ops"]:
            if record["kernel"] == "_cross_entropy_kernel":
                key = tuple(bool(c[name]) for name in ("COMPUTE_LSE", "WRITE_HIT", "WRITE_GRAD", "HAS_ROW_SCALE"))
            else:
                key = bool(c.get("HAS_RESIDUAL", c.get("HAS_DSUM")))
            flags.setdefault(op, set()).add(key)
    assert flags["cross_entropy_fwd"] == {(True, False, False, False)}
    for op in ("cross_entropy_bwd", "cross_entropy_bwd_inplace", "linear_cross_entropy_rows_bwd"):
        assert flags[op] == {(False, False, True, True)}
    assert flags["linear_cross_entropy_sum"] == {(True, True, True, False)}
    assert flags["linear_cross_entropy_rows"] == {(True, True, False, False)}
    assert flags["rms_norm_fwd"] == flags["rms_norm_bwd"] == {False}
    assert flags["add_rms_norm_fwd"] == flags["add_rms_norm_bwd"] == {True}
