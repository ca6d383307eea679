"""Every bad input is refused in one line, with exit code 2, writing nothing and leaving earlier
results byte-identical: a table of bad command lines across both scripts, and crafted CIFAR
pickles that must be refused without crashing the interpreter (run in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import snapshot

import run_cifar as rc
import run_spiral as rs
from apparatus import storage, synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY_SPIRAL = ["--width", "6", "--steps", "40", "--T", "10", "--quiet"]
TINY_CIFAR = ["--data", "synthetic", "--synthetic-train", "100", "--synthetic-test", "50"]
TINY_CIFAR += ["--image-size", "8", "--channels", "2", "--batch", "20", "--epochs", "2", "--quiet"]
SPIRAL_PHASE = ["--width", "6", "--A", "1,4", "--T", "10", "--seeds", "2", "--steps", "40"]
SPIRAL_PHASE += ["--quiet"]
ONSET = ["onset", "--T0", "20", "--periods", "2", "--width", "6", "--seed", "0", "--quiet"][1:]


def unwritable_dir():
    """A folder this process may not write to (root may write almost anywhere), or None."""
    for candidate in ("/proc/1", "/sys/kernel/security", "/"):
        if os.path.isdir(candidate) and not os.access(candidate, os.W_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """Earlier results that no refused command may touch: a spiral run, a spiral sweep, a CIFAR
    run and a CIFAR sweep, and a plain file."""
    root = tmp_path_factory.mktemp("prior")
    assert rs.main(["train", *TINY_SPIRAL, "--out", str(root / "spiral-run")]) == 0
    assert rs.main(["phase", *SPIRAL_PHASE, "--out", str(root / "spiral-phase")]) == 0
    assert (
        rc.main(["train", *TINY_CIFAR, "--A", "3", "--T", "4", "--out", str(root / "cifar-run")])
        == 0
    )
    cifar_phase = ["phase", *TINY_CIFAR, "--A", "1,3", "--T", "4", "--seeds", "1"]
    assert rc.main([*cifar_phase, "--out", str(root / "cifar-phase")]) == 0
    (root / "a-file").write_text("not a folder\n")
    good = dict(np.load(root / "spiral-run" / "run.npz"))
    for name, change in (
        ("spiral-nan-data", lambda a: a.update(X_train=np.full_like(a["X_train"], np.nan))),
        (
            "spiral-zero-width",
            lambda a: a.update(W1=a["W1"][:, :0], b1=a["b1"][:0], W2=a["W2"][:0]),
        ),  # fmt: skip
        ("spiral-complex", lambda a: a.update(W1=a["W1"] + 1j)),
    ):
        bad = dict(good)
        change(bad)
        (root / name).mkdir()
        np.savez(root / name / "run.npz", **bad)
    cifar = dict(np.load(root / "cifar-run" / "run.npz"))
    cifar["W3"] = np.full_like(cifar["W3"], np.nan)
    (root / "cifar-nan").mkdir()
    np.savez(root / "cifar-nan" / "run.npz", **cifar)
    return root


# (script, argv): OUT stands for a fresh folder; PRIOR/... for the earlier results
BAD = [
    # run_spiral.py train: numbers
    ("spiral", ["train", "--A", "0.5"]),
    ("spiral", ["train", "--A", "nan"]),
    ("spiral", ["train", "--A", "inf"]),
    ("spiral", ["train", "--A", "1e999"]),
    ("spiral", ["train", "--T", "0"]),
    ("spiral", ["train", "--T", "inf"]),
    ("spiral", ["train", "--T", "nan"]),
    ("spiral", ["train", "--width", "0"]),
    ("spiral", ["train", "--width", "-5"]),
    ("spiral", ["train", "--width", "1e12"]),
    ("spiral", ["train", "--width", "100000000000"]),
    ("spiral", ["train", "--steps", "0"]),
    ("spiral", ["train", "--steps", "1e12"]),
    ("spiral", ["train", "--steps", "1000000000000", "--log-every", "1"]),
    ("spiral", ["train", "--steps", "300"]),  # T = 1000 >= steps: no oscillating step
    ("spiral", ["train", "--lr", "0"]),
    ("spiral", ["train", "--lr", "-1"]),
    ("spiral", ["train", "--lr", "nan"]),
    ("spiral", ["train", "--lr", "inf"]),
    ("spiral", ["train", "--log-every", "0"]),
    ("spiral", ["train", "--val-every", "0"]),
    ("spiral", ["train", "--init", "xavier"]),
    ("spiral", ["train", "--loss", "hinge"]),
    ("spiral", ["train", "--val", "middle"]),
    ("spiral", ["train", "--device", "tpu"]),
    ("spiral", ["train", "--bogus", "1"]),
    ("spiral", ["bogus-command"]),
    # seeds
    ("spiral", ["train", "--seed", "a,b"]),
    ("spiral", ["train", "--seed", "-1"]),
    ("spiral", ["train", "--seed", "5-2"]),
    ("spiral", ["train", "--seed", "0-1000000000"]),
    ("spiral", ["train", "--seed", "1,1"]),
    # output folders
    ("spiral", ["train", "--out", ""]),
    ("spiral", ["train", "--out", "PRIOR/a-file"]),
    ("spiral", ["train", "--out", "PRIOR/a-file/under"]),
    ("spiral", ["train", "--out", "UNWRITABLE/x"]),
    ("spiral", ["train", *TINY_SPIRAL, "--A", "5", "--out", "PRIOR/spiral-run"]),  # other run
    ("spiral", ["train", *TINY_SPIRAL, "--out", "PRIOR/cifar-run"]),  # another kind of run
    ("spiral", ["train", *TINY_SPIRAL, "--out", "PRIOR/spiral-phase"]),  # a sweep
    # phase, merge, reeval
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", "1,nan", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", "1,inf", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--T", "20,inf", "--no-stop", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", "0.5,1", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", ",", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", "1,1", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--T", "0,10", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--T", "100", "--out", "OUT"]),  # T >= steps
    ("spiral", ["phase", *SPIRAL_PHASE, "--seeds", "0", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--seeds", "10000000000", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--seed0", "-1", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--seed-block", "0", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--batch", "0", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--shard", "3/2", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--shard", "x", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--out", ""]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--lr", "0.5", "--out", "PRIOR/spiral-phase"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--out", "PRIOR/spiral-run"]),
    ("spiral", ["merge", "--out", "OUT"]),
    ("spiral", ["merge", "--out", "PRIOR/spiral-run"]),
    ("spiral", ["merge", "--out", "PRIOR/cifar-phase"]),  # a sweep of the other script
    ("spiral", ["reeval", "--out", "PRIOR/spiral-phase", "--val", "middle"]),
    ("spiral", ["reeval", "--out", "PRIOR/cifar-phase", "--val", "inner"]),
    # dynamics, threshold, density
    ("spiral", ["dynamics", *TINY_SPIRAL, "--hess-every", "0"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--ntk-every", "-1"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--top-k", "0"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--log-every", "10", "--hess-every", "15"]),
    ("spiral", ["dynamics", "--quick", "--T", "500"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--seed", "-3"]),
    ("spiral", ["threshold", "--lrs", "1,nan"]),
    ("spiral", ["threshold", "--lrs", "0,1"]),
    ("spiral", ["threshold", "--widths", "0,10"]),
    ("spiral", ["threshold", "--widths", "10.5"]),
    ("spiral", ["threshold", "--T0", "100", "--steps0", "50"]),
    ("spiral", ["threshold", "--T0", "2", "--lrs", "1,4"]),
    ("spiral", ["threshold", "--static-steps", "0"]),
    ("spiral", ["density", *TINY_SPIRAL, "--at", "0,999999"]),
    ("spiral", ["density", *TINY_SPIRAL, "--at", "-1"]),
    ("spiral", ["density", *TINY_SPIRAL, "--seed", "0,1"]),
    ("spiral", ["density", *TINY_SPIRAL, "--probes", "0"]),
    # run_cifar.py train: numbers, data, folders
    ("cifar", ["train", *TINY_CIFAR, "--A", "0.5"]),
    ("cifar", ["train", *TINY_CIFAR, "--A", "nan"]),
    ("cifar", ["train", *TINY_CIFAR, "--T", "inf"]),
    ("cifar", ["train", *TINY_CIFAR, "--seed", "-1"]),
    ("cifar", ["train", *TINY_CIFAR, "--data-seed", "-1"]),
    ("cifar", ["train", *TINY_CIFAR, "--epochs", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--epochs", "1e9"]),
    ("cifar", ["train", *TINY_CIFAR, "--epochs", "100000000000"]),
    ("cifar", ["train", *TINY_CIFAR, "--batch", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--batch", "1000"]),  # larger than the training set
    ("cifar", ["train", *TINY_CIFAR, "--lr-peak", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--lr-final", "nan"]),
    ("cifar", ["train", *TINY_CIFAR, "--momentum", "1"]),
    ("cifar", ["train", *TINY_CIFAR, "--channels", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--dtype", "float16"]),
    ("cifar", ["train", *TINY_CIFAR, "--device", "tpu"]),
    ("cifar", ["train", *TINY_CIFAR, "--image-size", "12"]),
    ("cifar", ["train", *TINY_CIFAR, "--synthetic-train", "7"]),
    ("cifar", ["train", *TINY_CIFAR, "--peak-epoch", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--stop-epoch", "999"]),
    ("cifar", ["train", *TINY_CIFAR, "--eval-batch", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--checkpoint-every", "0"]),
    ("cifar", ["train", *TINY_CIFAR, "--hess-every", "-1"]),
    ("cifar", ["train", "--data", "PRIOR/nothing-here"]),
    ("cifar", ["train", "--data", "PRIOR/a-file", "--md5", "xyz"]),
    ("cifar", ["train", "--data", "digits", "--digits-train", "5"]),
    ("cifar", ["train", *TINY_CIFAR, "--out", "PRIOR/spiral-run"]),  # another kind of run
    ("cifar", ["train", *TINY_CIFAR, "--A", "7", "--out", "PRIOR/cifar-run"]),  # other settings
    ("cifar", ["train", *TINY_CIFAR, "--out", ""]),
    ("cifar", ["train", *TINY_CIFAR, "--out", "PRIOR/a-file/under"]),
    # run_cifar.py phase and merge
    ("cifar", ["phase", *TINY_CIFAR, "--A", "1,nan,5", "--out", "OUT"]),
    ("cifar", ["phase", *TINY_CIFAR, "--T", "0", "--out", "OUT"]),
    ("cifar", ["phase", *TINY_CIFAR, "--seeds", "0", "--out", "OUT"]),
    ("cifar", ["phase", *TINY_CIFAR, "--seeds", "99999999999", "--out", "OUT"]),
    ("cifar", ["phase", *TINY_CIFAR, "--seed0", "-1", "--out", "OUT"]),
    ("cifar", ["phase", *TINY_CIFAR, "--shard", "1/0", "--out", "OUT"]),
    (
        "cifar",
        ["phase", *TINY_CIFAR, "--A", "1,3", "--T", "4", "--seeds", "1", "--lr-peak", "0.1"]
        + ["--out", "PRIOR/cifar-phase"],
    ),  # fmt: skip
    ("cifar", ["merge", "--out", "PRIOR/spiral-phase"]),
    ("cifar", ["merge", "--out", "OUT"]),
    ("cifar", ["bogus-command"]),
    # onset: every list through the one parser (empty, repeated once normal, unreadable)
    ("spiral", ["onset", *ONSET, "--betas", ","]),
    ("spiral", ["onset", *ONSET, "--betas", "10,10.0"]),
    ("spiral", ["onset", *ONSET, "--betas", "relu,relu"]),
    ("spiral", ["onset", *ONSET, "--betas", "smooth"]),
    ("spiral", ["onset", *ONSET, "--betas", "0"]),
    ("spiral", ["onset", *ONSET, "--betas", "1e9"]),
    ("spiral", ["onset", *ONSET, "--dtypes", "float64,float64"]),
    ("spiral", ["onset", *ONSET, "--dtypes", "float16"]),
    ("spiral", ["onset", *ONSET, "--dtypes", ","]),
    ("spiral", ["onset", *ONSET, "--noise", "-1"]),
    ("spiral", ["onset", *ONSET, "--noise", "nan"]),
    ("spiral", ["onset", *ONSET, "--noise", "1e9"]),
    ("spiral", ["onset", *ONSET, "--force", "-1e-4"]),
    ("spiral", ["onset", *ONSET, "--force", "inf"]),
    ("spiral", ["onset", *ONSET, "--force", "1e-4,0.0001"]),
    ("spiral", ["onset", *ONSET, "--periods", "100000000"]),  # 3.6 TiB of series
    ("spiral", ["onset", *ONSET, "--lrs", "1e-300"]),  # T0/lr steps beyond counting
    ("spiral", ["onset", *ONSET, "--lrs", "0"]),
    ("spiral", ["onset", *ONSET, "--lrs", "1,1.0"]),
    ("spiral", ["onset", *ONSET, "--T0", "0"]),
    ("spiral", ["onset", *ONSET, "--T0", "inf"]),
    ("spiral", ["onset", *ONSET, "--T0", "1e13"]),
    ("spiral", ["onset", *ONSET, "--width", "1000000"]),  # its dense Hessians: petabytes
    ("spiral", ["onset", *ONSET, "--width", "0"]),
    ("spiral", ["onset", *ONSET, "--seed", "9223372036854775808"]),
    ("spiral", ["onset", *ONSET, "--seed", "0,1,1"]),
    ("spiral", ["onset", *ONSET, "--A", "1e308"]),
    ("spiral", ["onset", *ONSET, "--A", "0.5"]),
    ("spiral", ["onset", *ONSET, "--out", "PRIOR/spiral-run"]),
    # numbers the settings files would refuse later: refused now
    ("spiral", ["train", *TINY_SPIRAL, "--seed", "9223372036854775808"]),
    ("spiral", ["train", *TINY_SPIRAL, "--seed", "9223372036854775807-9223372036854775808"]),
    ("spiral", ["train", *TINY_SPIRAL, "--A", "1e308"]),  # Gamma's arithmetic overflows
    ("spiral", ["train", *TINY_SPIRAL, "--A", "1e10"]),
    ("spiral", ["train", "--T", "1e13", "--no-stop"]),
    ("spiral", ["train", *TINY_SPIRAL, "--lr", "1e-300"]),
    ("spiral", ["train", *TINY_SPIRAL, "--lr", "1e7"]),
    ("spiral", ["train", "--width", "10000000"]),  # its masks: 48 GB
    ("spiral", ["train", *TINY_SPIRAL, "--reference", "--width", "10000000"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--seed0", "9223372036854775807", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--seed0", "9223372036854775808", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--A", "1,1e308", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--lr", "1e-300", "--out", "OUT"]),
    ("spiral", ["phase", *SPIRAL_PHASE, "--width", "10000000", "--batch", "64", "--out", "OUT"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--width", "10000000"]),
    ("spiral", ["dynamics", *TINY_SPIRAL, "--seed", "9223372036854775808"]),
    ("spiral", ["threshold", "--lrs", "1e-300,1"]),
    ("spiral", ["threshold", "--lrs", "1,1.0"]),
    ("spiral", ["threshold", "--seed", "9223372036854775808"]),
    ("spiral", ["threshold", "--widths", "10000000"]),
    ("spiral", ["density", *TINY_SPIRAL, "--width", "100000000"]),
    ("cifar", ["train", *TINY_CIFAR, "--seed", "9223372036854775808"]),
    ("cifar", ["train", *TINY_CIFAR, "--A", "1e308"]),
    ("cifar", ["train", *TINY_CIFAR, "--T", "1e13"]),
    ("cifar", ["train", *TINY_CIFAR, "--channels", "30000", "--batch", "1", "--eval-batch", "1"]),
    (
        "cifar",
        ["phase", *TINY_CIFAR, "--seed0", "9223372036854775807", "--seeds", "2"] + ["--out", "OUT"],
    ),  # fmt: skip
    ("cifar", ["phase", *TINY_CIFAR, "--A", "1,1e308", "--out", "OUT"]),
    # check: the size, the seed, and a run read with --at validated before any row
    ("spiral", ["check", "--width", "1000000"]),
    ("spiral", ["check", "--width", "0"]),
    ("spiral", ["check", "--seed", "-1"]),
    ("spiral", ["check", "--seed", "9223372036854775808"]),
    ("spiral", ["check", "--at", "PRIOR/nothing-here"]),
    ("spiral", ["check", "--at", "PRIOR/a-file"]),
    ("spiral", ["check", "--at", "PRIOR/spiral-phase"]),  # a sweep, no run.npz
    ("spiral", ["check", "--at", "PRIOR/spiral-nan-data"]),
    ("spiral", ["check", "--at", "PRIOR/spiral-zero-width"]),
    ("spiral", ["check", "--at", "PRIOR/spiral-complex"]),
    ("spiral", ["check", "--at", "PRIOR/cifar-run"]),  # a Myrtle5 run
    ("spiral", ["check", "--loss", "hinge"]),
    ("cifar", ["check", "--width", "1000000"]),
    ("cifar", ["check", "--width", "0"]),
    ("cifar", ["check", "--at", "PRIOR/spiral-run"]),  # an MLP run
    ("cifar", ["check", "--at", "PRIOR/cifar-nan"]),
    ("cifar", ["check", "--device", "tpu"]),
    # rule: the folders it reads
    ("spiral", ["rule", "--every-step", "PRIOR/nothing-here", "--fig5", "PRIOR/spiral-phase"]),
    ("spiral", ["rule", "--every-step", "PRIOR/spiral-run", "--fig5", "PRIOR/spiral-phase"]),
]
NEW_ROWS = 75  # rows added with the one validation layer (onset, bounds, check --at, rule)


def resolve(argv, prior, tmp_path):
    """Put the fixture's folders into an argv (a fresh OUT by default)."""
    bad = unwritable_dir()
    out = []
    for a in argv:
        if a.startswith("UNWRITABLE"):
            if bad is None:
                pytest.skip("no folder here is closed to writing")
            a = a.replace("UNWRITABLE", bad)
        out.append(a.replace("PRIOR", str(prior)).replace("OUT", str(tmp_path / "fresh")))
    if "--out" not in argv and argv[0] not in ("merge", "reeval", "bogus-command", "check"):
        out += ["--out", str(tmp_path / "fresh")]
    return out


def test_the_table_has_at_least_sixty_lines():
    assert len(BAD) >= 119 + NEW_ROWS  # the table before the layer, and its new rows


@pytest.mark.parametrize("script,argv", BAD, ids=[f"{s}-{'_'.join(a)[:60]}" for s, a in BAD])
def test_bad_command_line_is_refused_in_one_line_and_writes_nothing(
    script, argv, prior, tmp_path, capsys
):
    main = {"spiral": rs.main, "cifar": rc.main}[script]
    before = snapshot(prior)
    with pytest.raises(SystemExit) as exit_:
        main(resolve(argv, prior, tmp_path))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "fresh").exists()  # nothing written
    assert snapshot(prior) == before  # earlier results byte-identical


# ---------------------------------------------------------------------------------------------
# Crafted CIFAR pickles: refused, in a subprocess, without crashing the interpreter
# ---------------------------------------------------------------------------------------------


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_bytes(data):
    """A byte string (SHORT_BINSTRING / BINSTRING: bytes under encoding='bytes')."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + len(data).to_bytes(4, "little") + data


def op_int(v):
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def array_pickle(dtype_name, dtype_state, shape, raw, core="numpy._core.multiarray"):
    """The opcodes of numpy's own array pickle, with the dtype and its state chosen freely."""
    dtype = op_global("numpy", "dtype") + op_tuple(op_bytes(dtype_name), b"\x89", b"\x88") + b"R"
    dtype += op_tuple(*dtype_state) + b"b"
    array = op_global(core, "_reconstruct")
    array += op_tuple(op_global("numpy", "ndarray"), op_tuple(op_int(0)), op_bytes(b"b")) + b"R"
    state = op_tuple(
        op_int(1), op_tuple(*(op_int(s) for s in shape)), dtype, b"\x89", op_bytes(raw)
    )
    return array + state + b"b"


def batch_pickle(data_ops, labels_ops):
    return b"\x80\x02}(" + op_bytes(b"data") + data_ops + op_bytes(b"labels") + labels_ops + b"u."


def labels(values):
    return b"](" + b"".join(op_int(v) for v in values) + b"e"


UINT8_STATE = (op_int(3), op_bytes(b"|"), b"N", b"N", b"N", op_int(-1), op_int(-1), op_int(0))
OBJECT_STATE = (op_int(3), op_bytes(b"|"), b"N", b"N", b"N", op_int(8), op_int(8), op_int(0))
GOOD_ROW = bytes(3072)

PAYLOADS = {
    # an object dtype with its flags cleared: raw bytes used as object pointers (a segfault)
    "object-pointers": batch_pickle(
        array_pickle(b"O", OBJECT_STATE, (2,), b"\x41" * 16), labels([0, 1])
    ),
    # the global numpy scalar, which builds a value straight from raw bytes
    "scalar": batch_pickle(
        op_global("numpy._core.multiarray", "scalar")
        + op_tuple(b"N", op_bytes(b"\x41" * 8))
        + b"R",
        labels([0]),
    ),  # fmt: skip
    "os-system": batch_pickle(
        op_global("os", "system") + op_tuple(op_bytes(b"true")) + b"R", labels([0])
    ),
    "uint8-with-odd-state": batch_pickle(
        array_pickle(b"u1", OBJECT_STATE, (1, 3072), GOOD_ROW), labels([0])
    ),
    "huge-shape": batch_pickle(
        array_pickle(b"u1", UINT8_STATE, (10**12, 3072), GOOD_ROW), labels([0])
    ),
    "short-raw": batch_pickle(
        array_pickle(b"u1", UINT8_STATE, (2, 3072), GOOD_ROW), labels([0, 1])
    ),
    "label-2**70": batch_pickle(
        array_pickle(b"u1", UINT8_STATE, (1, 3072), GOOD_ROW), labels([2**70])
    ),
    "label-negative": batch_pickle(
        array_pickle(b"u1", UINT8_STATE, (1, 3072), GOOD_ROW), labels([-1])
    ),
    "labels-not-a-list": batch_pickle(
        array_pickle(b"u1", UINT8_STATE, (1, 3072), GOOD_ROW), op_bytes(b"\x00")
    ),
    "not-a-pickle": b"\x00garbage\xff" * 10,
    "truncated": batch_pickle(array_pickle(b"u1", UINT8_STATE, (1, 3072), GOOD_ROW), labels([0]))[
        :60
    ],
}


def write_folder(folder, member, blob, meta_names=None):
    """A cifar-10-batches-py folder whose members are genuine except ``member``."""
    import pickle

    from apparatus.cifar_files import FOLDER_NAME, META_MEMBER, TEST_MEMBER, TRAIN_MEMBERS

    d = folder / FOLDER_NAME
    d.mkdir(parents=True)
    rows = np.zeros((2, 3072), np.uint8)
    good = pickle.dumps({b"data": rows, b"labels": [0, 1]}, protocol=2)
    names = meta_names if meta_names is not None else [f"c{k}".encode() for k in range(10)]
    for m in (*TRAIN_MEMBERS, TEST_MEMBER):
        (d / m).write_bytes(blob if m == member else good)
    (d / META_MEMBER).write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return d


def load_in_subprocess(folder):
    code = "import sys\nfrom apparatus import cifar_files\ncifar_files.load_cifar10(sys.argv[1])\n"
    return subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_crafted_pickles_are_refused_without_crashing(tmp_path, name):
    folder = write_folder(tmp_path, "data_batch_3", PAYLOADS[name])
    r = load_in_subprocess(folder)
    assert r.returncode == 1, (r.returncode, r.stderr[-500:])  # a Python exception, not a crash
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("apparatus.cifar_files.CifarError:"), last
    # through the command line: one line, exit 2
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "run_cifar.py"), "train", "--data", str(folder), "--quiet"]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-500:]
    assert not out.exists()


def test_non_utf8_label_names_are_refused(tmp_path):
    import pickle

    rows = np.zeros((2, 3072), np.uint8)
    good = pickle.dumps({b"data": rows, b"labels": [0, 1]}, protocol=2)
    folder = write_folder(tmp_path, "none", good, meta_names=[b"\xff\xfe"] * 10)
    r = load_in_subprocess(folder)
    assert r.returncode == 1 and "not UTF-8" in r.stderr


def test_an_enormous_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from apparatus import cifar_files as cifar

    folder = write_folder(tmp_path, "none", b"")
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 10)
    with pytest.raises(cifar.CifarError, match="larger than"):
        cifar.load_cifar10(folder)


# ---------------------------------------------------------------------------------------------
# Stored files: validated when read, named when bad, redone when possible
# ---------------------------------------------------------------------------------------------

SMALL_PHASE = ["phase", "--width", "6", "--A", "1,4", "--T", "10", "--seeds", "2", "--steps", "40"]
SMALL_PHASE += ["--seed-block", "1", "--quiet"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing-field", "bad-shape"])
def test_a_damaged_unit_is_named_by_merge_and_redone_by_a_rerun(tmp_path, capsys, damage):
    out = tmp_path / "p"
    assert rs.main([*SMALL_PHASE, "--out", str(out)]) == 0
    clean = np.load(out / "phase.npz")["val_acc"].copy()
    unit = out / "units" / "T000_A001_s00001.npz"
    data = unit.read_bytes()
    if damage == "truncated":
        unit.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        unit.write_bytes(b"")
    elif damage == "garbage":
        unit.write_bytes(os.urandom(len(data)))
    else:
        z = dict(np.load(unit))
        if damage == "missing-field":
            del z["val_acc"]
        else:
            z["val_acc"] = z["val_acc"][:0]
        np.savez(unit, **z)
    with pytest.raises(SystemExit) as e:
        rs.main(["merge", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "T000_A001_s00001.npz" in err and len(err.splitlines()) == 1
    assert rs.main([*SMALL_PHASE, "--out", str(out)]) == 0  # redoes that unit only, named
    printed = capsys.readouterr().out
    assert "1 of 4 units to run" in printed and "T000_A001_s00001.npz is " in printed
    np.testing.assert_array_equal(np.load(out / "phase.npz")["val_acc"], clean)


@pytest.mark.parametrize("content", [b"", b'{"kind": ', b"[1, 2]", b"\xff\xfe\x00"])
def test_a_malformed_sweep_json_is_refused_in_one_line(tmp_path, capsys, content):
    out = tmp_path / "p"
    out.mkdir()
    (out / "sweep.json").write_bytes(content)
    for argv in ([*SMALL_PHASE, "--out", str(out)], ["merge", "--out", str(out)]):
        with pytest.raises(SystemExit) as e:
            rs.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "sweep.json" in err
    assert (out / "sweep.json").read_bytes() == content


@pytest.mark.parametrize("damage", ["bad-crc", "missing-key", "garbage"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys, damage):
    import zipfile

    out = tmp_path / "c"
    argv = ["train", *TINY_CIFAR, "--A", "3", "--T", "4", "--checkpoint-every", "1"]
    assert rc.main([*argv, "--out", str(out)]) == 0
    ckpt = out / "checkpoint.npz"
    if damage == "bad-crc":  # flip a byte inside a stored member: the CRC check fails on read
        blob = bytearray(ckpt.read_bytes())
        with zipfile.ZipFile(ckpt) as zf:
            info = zf.getinfo("p_W1.npy")
        blob[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
        ckpt.write_bytes(bytes(blob))
    elif damage == "missing-key":
        z = dict(np.load(ckpt))
        del z["rng_state"]
        np.savez(ckpt, **z)
    else:
        ckpt.write_bytes(b"not a zip file")
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        rc.main([*argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "checkpoint" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before  # config.json not touched
    assert rc.main([*argv, "--overwrite", "--out", str(out)]) == 0  # an explicit fresh start
    assert any(p.name.startswith("checkpoint.npz.replaced-") for p in out.iterdir())  # kept


def test_resuming_on_other_data_is_refused(tmp_path, capsys):
    from apparatus import cifar_files as cifar

    archives = []
    for seed in (0, 1):
        path = tmp_path / f"a{seed}" / cifar.ARCHIVE_NAME
        path.parent.mkdir()
        synthetic.write_synthetic_archive(path, 20, 50, np.random.default_rng(seed), image_size=8)
        archives.append(path)
    argv = ["train", "--md5", "none", "--channels", "2", "--batch", "20", "--epochs", "2"]
    argv += ["--quiet", "--out", str(tmp_path / "run")]
    assert rc.main([*argv, "--data", str(archives[0])]) == 0
    with pytest.raises(SystemExit) as e:
        rc.main([*argv, "--data", str(archives[1])])  # the same settings, other images
    assert e.value.code == 2 and "data_fingerprint" in capsys.readouterr().err


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_stored(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "p"
    assert rs.main([*SMALL_PHASE, "--out", str(out)]) == 0
    stored = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "units" / "x.npz"))

    monkeypatch.setattr(storage.np, "savez", full)
    more = [a if a != "2" else "3" for a in SMALL_PHASE]  # one seed more: new units to write
    with pytest.raises(SystemExit) as e:
        rs.main([*more, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "no space left" in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "sweep.json"} == {
        k: v for k, v in stored.items() if k != "sweep.json"
    }  # no unit lost or half-written (sweep.json records the grown seed list)


def test_a_blow_up_diverges_the_same_way_in_run_cifar(tmp_path):
    out = tmp_path / "c"
    argv = ["train", *TINY_CIFAR, "--lr-peak", "1e6", "--lr-final", "1e6", "--epochs", "3"]
    assert rc.main([*argv, "--out", str(out)]) == 0
    z = np.load(out / "run.npz")
    assert int(z["diverged_epoch"]) >= 0
