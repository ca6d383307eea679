"""The Myrtle5 half of the ``check`` command (``python run_cifar.py check``): its layers, the
network, the R-operator, Nesterov, the fused copy of fast/myrtle5.py and, with --device gpu, the
CUDA table; one row each, through apparatus/checks.py's differences, judgements and table (its
docstring says how a row is computed). docs/check.md says what each row proves.

Symbols: N images, P parameters, c the width, K classes.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
from threadpoolctl import threadpool_limits

import dynloss
import models
from apparatus import memory
from apparatus.checks import (
    BLAS_THREADS,
    DIRECTIONS,
    FAIL,
    FD_RTOL,
    SAME_RTOL,
    Problem,
    Row,
    Schedule,
    add_options,
    fd_row,
    gamma_rows,
    judge,
    loss_rows,
    random_directions,
    read_run,
    refuse_bad,
    rel_error,
    report,
    run_schedule,
    run_settings,
    sections,
    spans,
)
from apparatus.cli import COUNT, check_memory, checked_backend, command
from apparatus.sweeps import check_unit
from dynloss import LOSSES, class_weights
from models import MYRTLE5_PARAM_NAMES

GPU_RTOL_F64 = 1e-10  # cuBLAS and our kernels against OpenBLAS: float64 in other orders
GPU_RTOL_F32 = 1e-4  # float32 kernels (direct, im2col, 3xTF32) against the float32 host; the HVP
# cancels more than the layers
GPU_RTOL_TF32 = 1e-2  # CUPY_TF32=1 rounds the GEMM inputs to 10-bit mantissas (5e-4 each)
LAYER_DIRECTIONS = 2  # random directions per argument of a Myrtle5 layer
MYRTLE5_IMAGES = 3  # N of the Myrtle5 check: small random images, as in tests/test_myrtle5.py
MYRTLE5_SIDE = 8  # image side: the smallest Myrtle5 takes (pools down to 1x1)
MYRTLE5_WIDTH = 3  # c at initialisation (a run's own c with --at)
MYRTLE5_IN, MYRTLE5_K = 3, 10  # CIFAR-10's colour channels and classes
NESTEROV_LR, NESTEROV_STEPS = 0.02, 3  # the Fig. 1 peak learning rate; steps of the Nesterov row
MYRTLE5_SCHEDULE = Schedule(A=50.0, T=100.0, stop=58200, t=130)  # Fig. 1's best cell, the
# CIFAR-10 protocol's stop (epoch 600 of 50000 // 512 = 97 steps)


def myrtle5_problem(width=MYRTLE5_WIDTH, loss=None, seed=0, dtype="float64", at=None):
    """The Myrtle5 check: MYRTLE5_IMAGES random images of MYRTLE5_SIDE^2 pixels and random
    labels, at initialisation (c = ``width``) or at the final parameters W1..b5 of a
    ``run_cifar.py train`` folder ``at`` (its c, channels and classes; its loss and Gamma(t)
    schedule unless ``loss`` is given)."""
    rng = np.random.default_rng(seed)
    s = MYRTLE5_SCHEDULE
    if at is None:
        need = memory.myrtle5_check(width, MYRTLE5_IN, MYRTLE5_K)
        check_memory(need, f"check at width c = {width}")
        params = models.init_myrtle5(rng, c=width, in_channels=MYRTLE5_IN, n_classes=MYRTLE5_K)
        where = f"initialisation (seed {seed})"
    else:
        arrays = read_run(at, MYRTLE5_PARAM_NAMES)
        params = {k: arrays[k] for k in MYRTLE5_PARAM_NAMES}
        W1, W5 = params["W1"], params["W5"]
        c, C_in = (W1.shape[3], W1.shape[2]) if W1.ndim == 4 else (0, 0)
        K = W5.shape[1] if W5.ndim == 2 else 0
        path = os.path.join(at, "run.npz")
        problem = check_unit(params, models.myrtle5_shapes(c, C_in, K))
        if not problem and min(c, C_in, K) < 1:
            problem = f"a Myrtle5 of width {c} with {C_in} channels and {K} classes"
        refuse_bad(path, problem, params)
        settings = run_settings(at)
        spe = arrays.get("steps_per_epoch")
        s = run_schedule(settings, s, int(spe) if spe is not None and spe.shape == () else 1)
        loss = loss or settings.get("loss")
        where = f"{path}, final parameters"
    loss = loss if loss in LOSSES else "ce"
    C_in, K = params["W1"].shape[2], params["W5"].shape[1]
    X = rng.normal(size=(MYRTLE5_IMAGES, MYRTLE5_SIDE, MYRTLE5_SIDE, C_in)).astype(dtype)
    y = rng.integers(0, K, size=MYRTLE5_IMAGES)
    gamma = class_weights(s.t, s.A, s.T, K, s.stop)  # (K,)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    return Problem("Myrtle5", params, X, y, gamma, loss, dtype, s, where, seed)


# ---------------------------------------------------------------------------------------------
# Myrtle5 (models.py): its layers, the network, the R-operator, Nesterov
# ---------------------------------------------------------------------------------------------


def myrtle5_states(cache):
    """The ReLU states (N, ...) of the four convolutions from a models.myrtle5_forward cache (the
    ReLU caches are the outputs h, positive exactly where z is)."""
    N = len(cache["relu1"])
    return np.concatenate([cache[f"relu{i}"].reshape(N, -1) > 0 for i in (1, 2, 3, 4)], axis=1)


def myrtle5_on(prob, keep):
    """The check's Myrtle5 on the images ``keep``: theta (P,) its parameters in float64; loss
    and grad : theta -> (value, ReLU states) in float64; gradient() and hvp(v): the hand-written
    derivatives at the parameters, in --dtype."""
    like, x, y, gamma = prob.params, prob.X[keep], prob.y[keep], prob.gamma
    like64, x64 = {k: v.astype(np.float64) for k, v in like.items()}, x.astype(np.float64)
    at = lambda theta: models.myrtle5_unflatten(theta, like64)

    def loss(theta):
        logits, cache = models.myrtle5_forward(x64, at(theta))
        return models.loss_on_batch(logits, y, gamma, prob.loss)[0], myrtle5_states(cache)

    def grad(theta):
        params = at(theta)
        grads = models.myrtle5_loss_and_grads(params, x64, y, gamma, prob.loss)[1]
        return models.myrtle5_flatten(grads), myrtle5_states(models.myrtle5_forward(x64, params)[1])

    gradient = lambda: models.myrtle5_flatten(
        models.myrtle5_loss_and_grads(like, x, y, gamma, prob.loss)[1]
    )
    hvp = lambda v: models.myrtle5_hvp(like, x, y, gamma, v, prob.loss)
    theta = models.myrtle5_flatten(like64)
    return SimpleNamespace(theta=theta, loss=loss, grad=grad, gradient=gradient, hvp=hvp)


def myrtle5_network_rows(prob):
    """The whole network's gradient (one random direction in each parameter array) against
    central differences of F, and its R-operator against central differences of the gradient."""
    tol, N = FD_RTOL[prob.dtype], len(prob.X)
    blocks = spans([prob.params[k].size for k in MYRTLE5_PARAM_NAMES])

    def build_grad(keep):
        f = myrtle5_on(prob, keep)
        V = random_directions(f.theta.size, 1, prob.rng("myrtle5 grad"), blocks)
        return f.theta, V, f.loss, V @ f.gradient()

    def build_hvp(keep):
        f = myrtle5_on(prob, keep)
        V = random_directions(f.theta.size, DIRECTIONS, prob.rng("myrtle5 hvp"))
        return f.theta, V, f.grad, np.stack([f.hvp(v) for v in V])

    return [
        fd_row("models.myrtle5_backward dF/dW1..db5", "central differences of F (per array)",
               build_grad, N, tol),
        fd_row("models.myrtle5_hvp Hv (R-operator)", "central differences of the gradient",
               build_hvp, N, tol),
    ]  # fmt: skip


def layer_inputs(prob):
    """The network's own arrays on the check batch (host, --dtype): each layer's inputs, random
    upstream gradients of its outputs' shapes (d_*), and what the GPU rows need besides."""
    P, L = prob.params, models
    logits, cache = models.myrtle5_forward(prob.X, P)
    z1 = L.conv3x3_forward(prob.X, P["W1"], P["b1"])[0]  # (N, Hx, Wx, c)
    z2 = L.conv3x3_forward(cache["relu1"], P["W2"], P["b2"])[0]
    a = dict(P, x=prob.X, z1=z1, h1=cache["relu1"], z2=z2, h2=cache["relu2"], h4=cache["relu4"])
    a.update(g=cache["dense5"][0], logits=logits, y=prob.y, gamma=prob.gamma)
    like = {"d_conv": z2, "d_pool": L.avgpool2_forward(z2)[0], "d_gap": a["g"], "d_dense": logits}
    like.update({"V2": P["W2"]}, **{"g" + k: P[k] for k in MYRTLE5_PARAM_NAMES})
    like.update({"v" + k: P[k] for k in MYRTLE5_PARAM_NAMES})  # a Nesterov velocity
    rng = prob.rng("layer inputs")
    a.update({k: rng.normal(size=v.shape).astype(prob.dtype) for k, v in like.items()})
    return a


def layer_specs(a):
    """(label, arguments (the first one indexed by sample), upstream gradient, forward(**args)
    -> (output, ReLU states or None), backward(dout, **args) -> the gradients in argument
    order) of every Myrtle5 layer of models.py, and of the fused ones of fast/myrtle5.py."""
    from fast import myrtle5 as fused  # the fused layers' rows

    L, F, relu = models, fused, lambda z: models.relu_forward(z)[0]
    conv, dense = L.conv3x3_forward, L.dense_forward
    return [
        ("models.conv3x3_backward", dict(x=a["h1"], W=a["W2"], b=a["b2"]), a["d_conv"],
         lambda x, W, b: (conv(x, W, b)[0], None),
         lambda d, x, W, b: L.conv3x3_backward(d, conv(x, W, b)[1])),
        ("models.relu_backward", dict(z=a["z2"]), a["d_conv"],
         lambda z: (relu(z), relu(z) > 0), lambda d, z: [L.relu_backward(d, relu(z))]),
        ("models.avgpool2_backward", dict(x=a["h2"]), a["d_pool"],
         lambda x: (L.avgpool2_forward(x)[0], None),
         lambda d, x: [models.avgpool2_backward(d, x.shape)]),
        ("models.global_avgpool_backward", dict(x=a["h4"]), a["d_gap"],
         lambda x: (L.global_avgpool_forward(x)[0], None),
         lambda d, x: [L.global_avgpool_backward(d, x.shape)]),
        ("models.dense_backward", dict(x=a["g"], W=a["W5"], b=a["b5"]), a["d_dense"],
         lambda x, W, b: (dense(x, W, b)[0], None),
         lambda d, x, W, b: L.dense_backward(d, dense(x, W, b)[1])),
        ("fast/myrtle5.relu_avgpool2_backward", dict(z=a["z2"]), a["d_pool"],
         lambda z: (L.avgpool2_forward(relu(z))[0], relu(z) > 0),
         lambda d, z: [F.relu_avgpool2_backward(d, z.shape, relu(z))]),
        ("fast/myrtle5.relu_conv3x3_backward", dict(z=a["z1"], W=a["W2"], b=a["b2"]), a["d_conv"],
         lambda z, W, b: (conv(relu(z), W, b)[0], relu(z) > 0),
         lambda d, z, W, b: F.relu_conv3x3_backward(d, relu(z), conv(relu(z), W, b)[1])),
    ]  # fmt: skip


def layer_row(prob, label, args, dout, forward, backward):
    """One layer's backward pass (in --dtype) against central differences (float64) of
    <forward(args), dout>, along LAYER_DIRECTIONS random directions in each argument."""
    names, rng = list(args), prob.rng(label)

    def build(keep):
        a, d = dict(args, **{names[0]: args[names[0]][keep]}), dout[keep]
        blocks = spans([a[k].size for k in names])
        theta = np.concatenate([a[k].ravel() for k in names]).astype(np.float64)
        V = random_directions(theta.size, LAYER_DIRECTIONS, rng, blocks)

        def value(t):
            parts = {
                k: t[s : s + n].reshape(a[k].shape) for k, (s, n) in zip(names, blocks, strict=True)
            }
            out, states = forward(**parts)
            return np.sum(out * d.astype(np.float64)), states

        return theta, V, value, V @ np.concatenate([np.ravel(g) for g in backward(d, **a)])

    what = f"{label} " + ", ".join("d" + k for k in names)
    against = "central differences of <out, dout>"
    return fd_row(what, against, build, len(dout), FD_RTOL[prob.dtype])


def nesterov_row(prob, a):
    """models.nesterov_step for NESTEROV_STEPS steps against its two
    lines written out here, from a random velocity with a random gradient per step."""
    m, flat = models.NESTEROV_MOMENTUM, models.myrtle5_flatten
    params = {k: a[k].copy() for k in MYRTLE5_PARAM_NAMES}
    velocity = {k: a["v" + k].copy() for k in MYRTLE5_PARAM_NAMES}
    theta, v = flat(params), flat(velocity)
    for step in range(NESTEROV_STEPS):
        grads = {k: (step + 1) * a["g" + k] for k in MYRTLE5_PARAM_NAMES}
        models.nesterov_step(params, grads, velocity, NESTEROV_LR)
        g = flat(grads)
        v = m * v + g  # Nesterov's two lines, deliberately independent of models.nesterov_step
        theta = theta - NESTEROV_LR * (g + m * v)
    error = rel_error([flat(params), flat(velocity)], [theta, v])
    what = f"models.nesterov_step, {NESTEROV_STEPS} steps"
    return judge(what, "v = m v + g; theta -= lr (g + m v)", error, SAME_RTOL[prob.dtype])


def gpu_cases(loss):
    """What each entry of the layer table computes in the GPU rows: (table, inputs) -> arrays."""
    conv = lambda L, a: L.conv3x3_forward(a["h1"], a["W2"], a["b2"])

    def nesterov(L, a):
        params = {k: a[k] for k in MYRTLE5_PARAM_NAMES}  # copies: the step edits them in place
        velocity = {k: a["v" + k] for k in MYRTLE5_PARAM_NAMES}
        L.nesterov_step(params, {k: a["g" + k] for k in MYRTLE5_PARAM_NAMES}, velocity, NESTEROV_LR)
        return list(params.values()) + list(velocity.values())

    return {
        "conv3x3_forward": lambda L, a: conv(L, a)[:1],
        "conv3x3_relu_forward": lambda L, a: L.conv3x3_relu_forward(a["h1"], a["W2"], a["b2"])[:1],
        "conv3x3_backward": lambda L, a: L.conv3x3_backward(a["d_conv"], conv(L, a)[1]),
        "relu_conv3x3_backward":
            lambda L, a: L.relu_conv3x3_backward(a["d_conv"], a["h1"], conv(L, a)[1]),
        "conv3x3_input_grad": lambda L, a: [L.conv3x3_input_grad(a["d_conv"], a["W2"])],
        "conv3x3_cached_forward": lambda L, a: [L.conv3x3_cached_forward(conv(L, a)[1], a["V2"])],
        "avgpool2_forward": lambda L, a: L.avgpool2_forward(a["h2"])[:1],
        "relu_avgpool2_backward":
            lambda L, a: [L.relu_avgpool2_backward(a["d_pool"], a["h2"].shape, a["h2"])],
        "dense_backward": lambda L, a: L.dense_backward(a["d_dense"], (a["g"], a["W5"])),
        "loss_on_batch": lambda L, a: L.loss_on_batch(a["logits"], a["y"], a["gamma"], loss),
        "nesterov_step": nesterov,
    }  # fmt: skip


def gpu_rows(prob, xp):
    """Each entry of fast/layers.py's GPU_LAYERS that is not fast/myrtle5.py's NumPy layer
    itself, run on the backend ``xp`` against CPU_LAYERS on the host on the same inputs (the
    network's own arrays), then the whole gradient and Hv on the GPU table against the
    reference (models.py) on the host."""
    from fast import gpu
    from fast import myrtle5 as fused
    from fast.layers import GPU_LAYERS

    tol = GPU_RTOL_F64
    if prob.dtype == "float32":
        tol = GPU_RTOL_TF32 if gpu.config().tf32 else GPU_RTOL_F32
    a, cases, rows = layer_inputs(prob), gpu_cases(prob.loss), []
    fresh = lambda: {k: v.copy() for k, v in a.items()}
    against = "fast/myrtle5.CPU_LAYERS on the host"
    for name, fast in vars(GPU_LAYERS).items():
        if fast is getattr(fused.CPU_LAYERS, name):
            continue  # the NumPy layer's own function, shared by both tables
        if name not in cases:
            rows.append(Row(f"GPU_LAYERS.{name}", "(no case written)", float("nan"), tol, FAIL))
            continue
        out, ref = (
            cases[name](GPU_LAYERS, dynloss.to_device(fresh(), xp)),
            cases[name](fused.CPU_LAYERS, fresh()),
        )
        rows.append(judge(f"GPU_LAYERS.{name}", against, rel_error(list(out), list(ref)), tol))
    v = prob.rng("gpu hvp").normal(size=models.myrtle5_flatten(prob.params).size)
    grads = lambda m, *a, **kw: m.myrtle5_loss_and_grads(*a, prob.loss, **kw)[1]
    hvp = lambda m, *a, **kw: {"Hv": m.myrtle5_hvp(*a, v, prob.loss, **kw)}
    on_host = (prob.params, prob.X, prob.y, prob.gamma)
    on_device = (dynloss.to_device(prob.params, xp), *(xp.asarray(b) for b in on_host[1:]))
    for what, run in (("myrtle5_loss_and_grads", grads), ("myrtle5_hvp", hvp)):
        out, ref = run(fused, *on_device, layers=GPU_LAYERS), run(models, *on_host)
        error = rel_error(list(out.values()), list(ref.values()))
        rows.append(judge(f"fast/myrtle5.{what}, GPU_LAYERS", "models.py on the host", error, tol))
    return rows


def fused_rows(prob):
    """fast/myrtle5.py's fused network on NumPy (what the commands run) against the reference:
    the same numbers in another order (its bias sums are GEMVs)."""
    from fast import myrtle5 as fused

    v = prob.rng("fused hvp").normal(size=models.myrtle5_flatten(prob.params).size)
    args = (prob.params, prob.X, prob.y, prob.gamma)
    flat = models.myrtle5_flatten
    rows = []
    for what, f in (
        ("myrtle5_loss_and_grads", lambda m: flat(m.myrtle5_loss_and_grads(*args, prob.loss)[1])),
        ("myrtle5_hvp", lambda m: m.myrtle5_hvp(*args, v, prob.loss)),
    ):
        error = rel_error(f(fused), f(models))
        rows.append(judge(f"fast/myrtle5.{what}", "models.py (the reference)", error,
                          SAME_RTOL[prob.dtype]))  # fmt: skip
    return rows


@threadpool_limits.wrap(limits=BLAS_THREADS)
def myrtle5_rows(prob, xp=np):
    """Every row of the Myrtle5 table, in sections; the GPU rows when ``xp`` is CuPy."""
    logits = models.myrtle5_forward(prob.X, prob.params)[0][None]  # (1, N, K)
    first = loss_rows(logits, prob.y, prob.gamma, prob) + gamma_rows(prob.schedule, logits.shape[2])
    a = layer_inputs(prob)
    layers = [layer_row(prob, *spec) for spec in layer_specs(a)] + [nesterov_row(prob, a)]
    named = [
        ("dynloss.py: the loss in the logits, Gamma(t)", first),
        (f"models.py: the Myrtle5 layers ({prob.dtype})", layers),
        (f"models.py: Myrtle5 ({prob.dtype})", myrtle5_network_rows(prob)),
        (f"fast/myrtle5.py: the fused copy ({prob.dtype})", fused_rows(prob)),
    ]
    if xp is not np:
        named.append(("fast/layers.py on the GPU", gpu_rows(prob, xp)))
    return sections(*named)


def check_cifar_check(args):
    """``run_cifar.py check``: the backend, the problem (a run read with --at is validated),
    the memory of its weights."""
    xp = checked_backend(args.device)  # --device gpu without CuPy or a GPU: one line, exit 2
    start = time.perf_counter()
    prob = myrtle5_problem(args.width, args.loss, args.seed, args.dtype, args.at)
    W1, W5 = prob.params["W1"], prob.params["W5"]
    need = memory.myrtle5_check(W1.shape[3], W1.shape[2], W5.shape[1])
    return {"problem": prob, "xp": xp, "start": start, "memory": need,
            "what": "the Myrtle5 check"}  # fmt: skip


@command(check_cifar_check)
def cmd_cifar_check(args, plan):
    """``run_cifar.py check``: print the Myrtle5 table; return 0 (no FAIL) or 1."""
    prob = plan["problem"]
    return report(prob, myrtle5_rows(prob, plan["xp"]), time.perf_counter() - plan["start"])


def add_cifar_check_command(sub):
    """The ``check`` subcommand of run_cifar.py (sub: an argparse subparsers object)."""
    p = sub.add_parser("check", help="every hand-written derivative of Myrtle5, one table")
    p.add_argument("--width", "--channels", dest="width", type=COUNT, default=MYRTLE5_WIDTH,
                   help="Myrtle5 width c (--at: the run's)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="gpu: also fast/layers.py's CUDA table on the GPU")  # fmt: skip
    add_options(p)
    p.set_defaults(func=cmd_cifar_check)
