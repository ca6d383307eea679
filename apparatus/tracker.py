"""Following the spectra along a training run: the tracker's warm starts and bookkeeping
(Figs. 4 and 5), the zoomed replay, and the Hessian's density at chosen steps.

:class:`SpectraTracker` is an ``on_log`` callback of the spiral trainers: at logged steps it
measures the top Hessian eigenvalue and the NTK's lambda_max with the fast operators of
fast/mlp_spectra.py (tied to spectra.py's references by tests), warm-starting each Lanczos run
from the previous eigenvector. :func:`track` trains networks each followed by a tracker;
:func:`zoom_replay` replays a window with spectra at every step; :func:`densities_along` draws
the Hessian's whole eigenvalue density at chosen steps. ``reference=True`` (``--reference``)
trains with spiral.train_reference instead of the fast trainer and measures with spectra.py's
operators (the R-operator and Jacobian products of models.py) instead of the fused copies.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

import spectra
from apparatus import signals
from beyond.density import SLQ_PROBES, SLQ_STEPS, hutchinson_trace, spectral_density
from dynloss import class_weights
from models import mlp_forward
from spectra import top_eigs, warm_top_eig
from spiral import train_reference

TRACK_TOL = 1e-3  # tracker's relative residual: measured eigenvalue errors <= 1e-5 (benchmark)
TRACK_MIX = 0.03  # weight of a random unit vector added to each warm start (see SpectraTracker)
TRACK_COLD_TOL = 1e-10  # eigsh's tolerance for the tracker's first (cold) call
TRACK_COLD_NCV = 20  # eigsh's Lanczos basis for a cold start (its usual default), > TOP_K_MAX
MIX_SEED = 0  # the random directions mixed into the warm starts
GAMMA_BLOCK = 4096  # the tracker evaluates Gamma(t) for this many steps at once
TOP_K_MAX = 19  # Hessian eigenvalues a tracker can follow: below its cold-start basis (20)
ZOOM_PAD = 50  # steps shown on each side of a zoomed instability (at least)
ZOOM_FALLBACK = 0.1  # without any instability, show +- this fraction of a period mid-run
SPECTRA_FIELDS = ("hess_step", "hess_lmax", "hess_topk", "ntk_step", "ntk_lmax", "ntk_traced_lmax")


def train(params0, data, spec, reference=False, xp=np, on_log=None, progress=None):
    """Train one block of networks with spiral.train_reference (``reference``) or the fast
    trainer's train_block: the same arguments and the same result (spiral.finish_run)."""
    if reference:
        return train_reference(params0, data, spec, on_log=on_log, progress=progress)
    from fast.spiral_trainer import train_block  # the fast path only: --reference loads none

    return train_block(params0, data, spec, xp=xp, on_log=on_log, progress=progress)


class SpectraTracker:
    """An ``on_log(step, params_host)`` callback of the spiral trainers (:func:`train`).

    At steps that are multiples of ``every`` it computes, for network ``net`` of the block and
    the current Gamma = dynloss.class_weights(step, A, T, K, stop_step), the top-k Hessian
    eigenvalues, and at multiples of ``ntk_every`` (default: ``every``; 0: never) lambda_max of
    the full and of the traced NTK, on one shared forward pass. ``force=True`` measures what
    was not measured at this step yet, whatever the step (used for the final parameters).
    The first call (and the first after a divergence) is a cold eigsh to TRACK_COLD_TOL;
    later calls start from the previous eigenvectors plus ``mix`` times a random unit vector
    (so that an eigenvalue rising past the previous top one still appears in the Krylov space)
    and stop at relative residual ``tol``: :func:`warm_top_eig` for k = 1, :func:`top_eigs`
    (eigsh) for k > 1. At the defaults the eigenvalues are within tol = 1e-3 of an eigenvalue
    by construction and measured within 1e-5 (relative) of the exact lambda_max (tests,
    benchmarks/bench_spectra.py), about 3 Hessian and 4 NTK products per call. Results:

    hess_step (S,), hess_lmax (S,), hess_topk (S, k), ntk_step (S,), ntk_lmax (S,),
    ntk_traced_lmax (S,); ``seconds``: time spent in the callback; ``products``: operator
    products per operator, all calls. A network whose logits are not finite gets NaN rows and
    cold starts afterwards. For the Fig. 4 threshold (:func:`hessian_threshold`) track at an odd
    stride: at an even one the two branches of a period-two bounce are never both seen.
    """

    def __init__(
        self,
        X,
        y,
        spec,
        net=0,
        k=1,
        every=1,
        tol=TRACK_TOL,
        mix=TRACK_MIX,
        ntk=True,
        ntk_every=None,
        reference=False,
    ):
        """X (N, D), y (N,) training data; spec: any object with A, T, stop_step ((M,) arrays
        or scalars) and loss, e.g. spiral.TrainSpec; reference: the operators of spectra.py
        (models' R-operator and Jacobian products) instead of fast/mlp_spectra.py's."""
        self.reference = reference
        self.X = np.asarray(X, dtype=np.float64)  # (N, D)
        self.y = np.asarray(y)
        pick = lambda a: None if a is None else float(np.atleast_1d(a)[net])
        self.A, self.T, self.stop_step = pick(spec.A), pick(spec.T), pick(spec.stop_step)
        self.loss = getattr(spec, "loss", "ce")
        self.net, self.k, self.every, self.tol = net, k, every, tol
        self.ntk_every = (every if ntk_every is None else ntk_every) if ntk else 0
        self.with_ntk = self.ntk_every > 0
        self.products = {"hess": 0, "ntk": 0, "traced": 0}
        self.mix, self._rng = mix, np.random.default_rng(MIX_SEED)
        self.seconds = 0.0
        self._rows = {"hess": [], "ntk": []}
        self._vecs = {"hess": None, "ntk": None, "traced": None}
        self._gamma = (None, None)  # (first step, (GAMMA_BLOCK, K)) class weights ahead
        self._work = None  # (N, H) buffers of fast.mlp_spectra.net_state, reused

    def gamma_at(self, step, K):
        """Gamma(step) (K,), from class_weights evaluated for GAMMA_BLOCK steps at a time."""
        start, block = self._gamma
        if start is None or not 0 <= step - start < len(block) or block.shape[1] != K:
            start = step
            steps = np.arange(step, step + GAMMA_BLOCK)
            block = class_weights(steps, self.A, self.T, K, self.stop_step)  # (GAMMA_BLOCK, K)
            self._gamma = (start, block)
        return block[step - start]

    def __call__(self, step, params_host, force=False):
        last = lambda which: self._rows[which][-1][0] if self._rows[which] else None
        do_hess = (force or step % self.every == 0) and last("hess") != step
        do_ntk = self.with_ntk and (force or step % self.ntk_every == 0) and last("ntk") != step
        if not (do_hess or do_ntk):
            return
        t0 = time.perf_counter()
        one = {name: np.asarray(a)[self.net : self.net + 1] for name, a in params_host.items()}
        K = one["W2"].shape[2]
        gamma = self.gamma_at(step, K)  # (K,)
        N, P = len(self.X), spectra.n_params(one)
        if self.reference:  # spectra.py's operators on models.py's derivatives
            logits = mlp_forward(self.X, one)[0]
            hess = lambda: spectra.hessian_matvec(one, self.X, self.y, gamma, self.loss)
            ntk = lambda: spectra.ntk_matvec(one, self.X)
            traced = lambda: spectra.ntk_traced_matvec(one, self.X)
        else:  # the fused copies of fast/mlp_spectra.py, into reused (N, H) buffers
            from fast.mlp_spectra import hessian_matvec, net_state, ntk_matvec, ntk_traced_matvec

            shape = (N, one["W2"].shape[1])
            if self._work is None or self._work["h1"].shape != shape:
                self._work = {"h1": np.empty(shape), "mask": np.empty(shape)}
            s = net_state(one, self.X, work=self._work)
            logits = s["logits"]
            hess = lambda: hessian_matvec(s, self.y, gamma, self.loss)
            ntk, traced = lambda: ntk_matvec(s), lambda: ntk_traced_matvec(s)
        if not np.all(np.isfinite(logits)):
            self._vecs = dict.fromkeys(self._vecs)
            if do_hess:
                self._rows["hess"].append((step, np.full(self.k, np.nan)))
            if do_ntk:
                self._rows["ntk"].append((step, np.nan, np.nan))
            self.seconds += time.perf_counter() - t0
            return
        if do_hess:
            vals, self._vecs["hess"] = self._top(hess(), "hess", P)
            self._rows["hess"].append((step, vals))
        if do_ntk:
            lam, self._vecs["ntk"] = self._top(ntk(), "ntk", N * K)
            lam_tr, self._vecs["traced"] = self._top(traced(), "traced", N)
            self._rows["ntk"].append((step, lam[0], lam_tr[0]))
        self.seconds += time.perf_counter() - t0

    def _top(self, matvec, which, n):
        """Top eigenpair(s) of one operator (n, n), cold or warm (class docstring): (k,), (n, k)."""
        k = self.k if which == "hess" else 1
        v0 = self._vecs[which]

        def counted(v):
            self.products[which] += 1
            return matvec(v)

        if v0 is None:
            return top_eigs(counted, n, n_eig=k, tol=TRACK_COLD_TOL, ncv=min(n, TRACK_COLD_NCV))
        if self.mix > 0:
            r = self._rng.normal(size=(n, v0.shape[1]))
            v0 = v0 + self.mix * r / np.linalg.norm(r, axis=0)
        if k == 1:
            lam, vec, _ = warm_top_eig(counted, n, v0=v0, tol=self.tol)
            return np.array([lam]), vec[:, None]
        return top_eigs(counted, n, n_eig=k, v0=v0, tol=self.tol)

    @property
    def hess_step(self):
        return np.array([r[0] for r in self._rows["hess"]], dtype=np.int64)

    @property
    def hess_topk(self):
        return np.array([r[1] for r in self._rows["hess"]]).reshape(-1, self.k)

    @property
    def hess_lmax(self):
        return self.hess_topk[:, 0]

    @property
    def ntk_step(self):
        return np.array([r[0] for r in self._rows["ntk"]], dtype=np.int64)

    @property
    def ntk_lmax(self):
        return np.array([r[1] for r in self._rows["ntk"]], dtype=np.float64)

    @property
    def ntk_traced_lmax(self):
        return np.array([r[2] for r in self._rows["ntk"]], dtype=np.float64)

    def arrays(self):
        """Every tracked series in a dict (for np.savez)."""
        return {name: getattr(self, name) for name in SPECTRA_FIELDS}


def stride_problem(every, ntk_every, log_every):
    """Why spectra every ``every`` (Hessian) and ``ntk_every`` (NTK; 0: never) steps cannot be
    taken along a run logged every ``log_every`` steps, or None: the tracker sees logged steps
    only, so a stride that is not a multiple of the log stride would be sampled elsewhere."""
    for flag, stride in (("--hess-every", every), ("--ntk-every", ntk_every)):
        if stride % log_every:
            return f"{flag} {stride} must be a multiple of --log-every {log_every}"
    return None


def track(params0, data, spec, k=1, every=25, ntk_every=25, reference=False, xp=np, progress=None):
    """Train M networks side by side, each followed by a :class:`SpectraTracker`.

    params0 : W1 (M, D, H), ...;  data : (X, y, Xv, yv);  spec : TrainSpec of the M networks
    The last entries of each network's spectra are measured at its final parameters (unless it
    diverged). Returns (the train_block result, [the tracker arrays of each network]).
    """
    problem = stride_problem(every, ntk_every, spec.log_every)
    if problem:
        raise ValueError(problem)
    M = params0["W1"].shape[0]
    trackers = [
        SpectraTracker(
            data[0], data[1], spec, m, k, every, ntk_every=ntk_every, reference=reference
        )
        for m in range(M)
    ]

    def on_log(step, params_host):
        for tracker in trackers:
            tracker(step, params_host)

    with threadpool_limits(limits=1):  # small products are slower on two BLAS threads
        res = train(params0, data, spec, reference, xp, on_log, progress)
    spectra = []
    for m, tracker in enumerate(trackers):
        d = res["diverged_step"][m]
        if d < 0:
            tracker(spec.steps, res["params"], force=True)
        arrays = tracker.arrays()
        if d >= 0:  # a diverged network's spectra after its divergence are not its training's
            for steps, fields in (
                ("hess_step", ("hess_lmax", "hess_topk")),
                ("ntk_step", ("ntk_lmax", "ntk_traced_lmax")),
            ):
                late = arrays[steps] > d
                for f in fields:
                    arrays[f] = np.where(
                        late if arrays[f].ndim == 1 else late[:, None], np.nan, arrays[f]
                    )
        spectra.append(arrays)
    return res, spectra


def zoom_replay(params0, data, spec, window, k=1, every=1, ntk=True, reference=False, xp=np):
    """Replay a run (it is deterministic) up to the end of ``window`` = (t0, t1), measuring the
    spectra every ``every`` steps inside it: the zoomed panels (k), (l) of Fig. 4. Returns the
    tracker's arrays with a ``zoom_`` prefix."""
    t0, t1 = max(0, window[0]), min(spec.steps, window[1])
    tracker = SpectraTracker(
        data[0], data[1], spec, k=k, every=every, ntk_every=every if ntk else 0,
        reference=reference,
    )  # fmt: skip
    replay = replace(spec, steps=t1, log_every=1, val_every=t1 + 1)  # spectra only
    inside = lambda step, params: tracker(step, params) if t0 <= step <= t1 else None
    with threadpool_limits(limits=1):
        train(params0, data, replay, reference, xp, on_log=inside, progress=signals.checking())
    return {"zoom_" + key: v for key, v in tracker.arrays().items()}


def zoom_window(info, step, T):
    """(t0, t1) around the first instability of lambda_max after the first period (else of F,
    else mid-run): two ints. info : :func:`analyze`'s dict;  step : (S,) logged steps."""
    for s0, s1 in (("thr_start", "thr_end"), ("bif_start", "bif_end")):
        if len(info[s0]):
            later = np.flatnonzero(info[s0] >= T)  # past the first period's transient if we can
            i = later[0] if len(later) else 0
            a, b = int(info[s0][i]), int(info[s1][i])
            pad = max(ZOOM_PAD, (b - a) // 2)
            return a - pad, b + pad
    mid = int(step[-1] // 2)
    return mid - int(T * ZOOM_FALLBACK), mid + int(T * ZOOM_FALLBACK)


# ---------------------------------------------------------------------------------------------
# The Hessian's spectral density along a run (stochastic Lanczos quadrature, Hutchinson's trace)
# ---------------------------------------------------------------------------------------------

DENSITY_SEED = 0  # the random probes of the densities and traces (with the step: one per step)


def densities_along(
    params0, data, spec, at, probes=SLQ_PROBES, steps=SLQ_STEPS, reference=False, xp=np
):
    """The Hessian's eigenvalue density and trace at the steps ``at`` of one run (M = 1).

    The run is trained with log_every = gcd(at, spec.steps), so that every step of ``at`` is a
    logged one. At each of them: beyond/density.spectral_density (stochastic Lanczos quadrature,
    ``probes`` Gaussian probes of ``steps`` Lanczos steps) and beyond/density.hutchinson_trace, with
    Gamma of that step. Returns a dict: at (S,), grid (S, G), density (S, G) (each row
    integrates to 1), nodes (S, probes, m), weights (S, probes, m), trace (S,), trace_stderr (S,),
    slq_trace (S,) (P times the mean of the nodes under their weights), lmax (S,) (the largest
    node: lambda_max to Lanczos accuracy), and the final train_block result as ``run``.
    """
    at = sorted({int(t) for t in at})
    X, y = data[0], data[1]
    K = params0["W2"].shape[2]
    rows = {}

    def on_log(step, params_host):
        if step not in at:
            return
        one = {name: np.asarray(a)[:1] for name, a in params_host.items()}
        gamma = class_weights(step, spec.A[0], spec.T[0], K, spec.stop_step[0])  # (K,)
        if reference:
            matvec = spectra.hessian_matvec(one, X, y, gamma, spec.loss)
        else:
            from fast.mlp_spectra import hessian_matvec, net_state

            matvec = hessian_matvec(net_state(one, X), y, gamma, spec.loss)
        P = spectra.n_params(one)
        rng = np.random.default_rng([DENSITY_SEED, step])
        grid, density, nodes, weights = spectral_density(matvec, P, rng, m=steps, n_probes=probes)
        trace, stderr = hutchinson_trace(matvec, P, rng)
        slq = P * float(np.mean((weights * nodes).sum(axis=1)))
        rows[step] = (grid, density, nodes, weights, trace, stderr, slq, nodes.max())

    every = int(np.gcd.reduce(np.array(at + [spec.steps], dtype=np.int64)))
    every = max(every, 1)
    replay = replace(spec, log_every=every)
    with threadpool_limits(limits=1):
        res = train(params0, data, replay, reference, xp, on_log, signals.checking())
    done = [t for t in at if t in rows]  # a diverged run stops logging
    names = ("grid", "density", "nodes", "weights", "trace", "trace_stderr", "slq_trace", "lmax")
    out = {"at": np.array(done, dtype=np.int64)}
    for i, name in enumerate(names):
        out[name] = np.array([rows[t][i] for t in done])
    out["run"] = res
    return out
