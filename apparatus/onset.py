"""Where the instabilities begin (beyond the paper): the top Hessian eigenvalue and the period-two
mode at every step of a run, and the units of an onset sweep.

An onset run is spiral.train_reference logging every step, with an :class:`OnsetTracker` per
network as its callback. The tracker measures lambda_max of the exact Hessian by Lanczos
warm-started from the previous eigenvector, converged to a relative residual ONSET_TOL (and
checked against the dense eigensolver every VERIFY_EVERY steps): at every step from the first
where eta lambda_max >= 2 HOT_FRACTION until it has stayed below for HOT_MEMORY steps, and every
COLD_EVERY steps otherwise. At every step it records the hidden pre-activations that change sign
(and those that change back at the next step), the cosine of consecutive updates, the update's
projection on the top eigenvector, the amplitude of the period-two mode along it (``mode``:
beyond/onset.alternating_amplitude of the last MODE_ORDER + 1 parameter vectors projected on
the eigenvector) and, for comparison, the logits' second difference (``amp_logits``, which
includes their smooth acceleration). Where eta lambda crosses 2 and where the Fig. 4 rule starts
an instability, it computes the dense spectra: the Hessian, its Gauss-Newton part, the
loss-weighted NTK and the plain NTK (spectra.py). A forced run adds f (-1)^t v after every
update t (:meth:`OnsetTracker.force_step`).

apparatus/onset_analysis.py reads the units; docs/onset.md describes the experiment and its
fields.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import spectra
import stability
from apparatus import sweeps
from apparatus.workers import WORKERS, run_jobs
from beyond.onset import alternating_amplitude
from beyond.smooth import activation
from dynloss import class_weights
from models import RELU, flatten, init_mlp, unflatten
from spiral import D_SPIRAL, K_SPIRAL, TrainSpec, spiral_data, train_reference

ONSET_TOL = 1e-5  # Lanczos residual / |lambda| at every step: within 1e-5 of an eigenvalue, and
# within about (1e-5 lambda)^2 / gap of lambda_max (checked against the dense one, VERIFY_*)
ONSET_MIX = 0.03  # a random unit vector of this weight joins each warm start (as the tracker's)
MIX_SEED = 1  # its stream
VERIFY_EVERY = 250  # steps between dense checks of the warm-started value
VERIFY_RTOL = 1e-4  # a warm value this far from the dense lambda_max (another eigenvalue) is
# replaced by it and counted
MAX_EVENTS = 400  # dense spectra at most this many times per run
RULE_STRIDE = 25  # the Fig. 4-5 threshold's tracking stride (the published measurement)
HOT_FRACTION = 0.6  # lambda_max at every step once eta lambda_max >= this times 2 ...
HOT_MEMORY = 250  # ... until it has stayed below for this many steps (a cascade's lower branch
# can fall far below: its steps are measured too) ...
COLD_EVERY = 5  # ... and every this many steps otherwise (a divisor of RULE_STRIDE, VERIFY_EVERY)
GAMMA_BLOCK = 4096  # Gamma(t) is evaluated for this many steps at once
SERIES = ("lam", "products", "flips", "flipbacks", "cos", "proj", "mode", "amp_logits")
MODE_ORDER = 4  # the mode is read from the 4th difference of theta: a smooth drift of time scale
# tau enters as tau^-4, the alternation c (-1)^t as 16 c (beyond.onset.alternating_amplitude)
EVENT_KINDS = ("onset", "rule")  # eta * midpoint crosses 2; the rule's bouncing pair starts
EVENT_FIELDS = ("lam_dense", "lam_gn", "lam_wntk", "lam_ntk")


def top_eigenvalue(matrix):
    """The largest eigenvalue and its eigenvector of a symmetric matrix (LAPACK, subset)."""
    n = len(matrix)
    vals, vecs = eigh(matrix, subset_by_index=[n - 1, n - 1])
    return float(vals[0]), vecs[:, 0]


class OnsetTracker:
    """The per-step measurements of network ``net`` of a run (module docstring): an ``on_log``
    callback of spiral.train_reference with log_every = 1. X (N, D), y (N,); spec: the run's
    TrainSpec (A, T, stop_step, lr, loss); act: the network's activation (models.RELU, or
    beyond/smooth.py's softplus); force: the size f of a period-two forcing f (-1)^t v added
    along the top eigenvector v after every update t (:meth:`force_step`, an after_update
    callback; 0: none)."""

    def __init__(self, X, y, spec, net=0, force=0.0, act=RELU):
        self.X, self.y, self.net = np.asarray(X, dtype=np.float64), np.asarray(y), net
        pick = lambda a: float(np.atleast_1d(a)[net])
        self.A, self.T, self.stop = pick(spec.A), pick(spec.T), pick(spec.stop_step)
        self.lr, self.loss, self.act = spec.lr, spec.loss, act
        self.series = {f: np.full(spec.steps + 1, np.nan) for f in SERIES}
        self.events = []  # (step, kind, lam_dense, lam_gn, lam_wntk, lam_ntk)
        self.verified, self.replaced = 0, 0
        self._rng = np.random.default_rng(MIX_SEED)
        self._vec = None
        self._prev = []  # the last two steps: (params, theta, logits, signs)
        self._thetas = []  # the last MODE_ORDER + 1 parameter vectors (P,)
        self._dtheta = None  # the previous update
        self._work = None  # the (N, H) buffers of fast_spectra.net_state
        self._last = None  # the last lambda_max measured
        self._hot_until = -1  # every step is measured up to this one (HOT_MEMORY)
        self.force = force
        self._gammas = (None, None)  # (first step, (GAMMA_BLOCK, K)) class weights ahead

    def _gamma(self, step):
        """Gamma(step) (K,), from class_weights evaluated for GAMMA_BLOCK steps at a time."""
        start, block = self._gammas
        if start is None or not 0 <= step - start < len(block):
            start = step
            block = class_weights(np.arange(step, step + GAMMA_BLOCK), self.A, self.T, K_SPIRAL,
                                  self.stop)  # fmt: skip
            self._gammas = (start, block)
        return block[step - start]

    def _top(self, matvec, one, step, P):
        """lambda_max and its eigenvector by Lanczos from the previous one, checked against the
        dense eigensolver every VERIFY_EVERY steps; returns (lambda_max, products)."""
        v0 = self._vec
        if v0 is not None:
            r = self._rng.normal(size=len(v0))
            v0 = v0 + ONSET_MIX * r / np.linalg.norm(r)
        lam, vec, n = spectra.warm_top_eig(matvec, P, v0=v0, tol=ONSET_TOL)
        if self._vec is None or step % VERIFY_EVERY == 0:
            args = (one, self.X, self.y, self._gamma(step), self.loss)
            dense, dense_vec = top_eigenvalue(spectra.hessian(*args, act=self.act))
            self.verified += 1
            if abs(lam - dense) > VERIFY_RTOL * abs(dense):
                self.replaced += 1
                lam, vec = dense, dense_vec
        if self._vec is not None and vec @ self._vec < 0:
            vec = -vec  # the eigenvector's sign follows the previous one's
        self._vec, self._last = vec, lam
        return lam, n

    def _dense(self, one, step, kind):
        """Record the dense spectra of one network's parameters ``one`` at ``step``."""
        if len(self.events) >= MAX_EVENTS:
            return
        args = (one, self.X, self.y, self._gamma(step), self.loss)
        gn, network = spectra.hessian(*args, parts=True, act=self.act)
        row = (top_eigenvalue(gn + network)[0], top_eigenvalue(gn)[0])
        row += (top_eigenvalue(spectra.weighted_ntk(*args, act=self.act))[0],)
        row += (top_eigenvalue(spectra.ntk(one, self.X, act=self.act))[0],)
        self.events.append((step, EVENT_KINDS.index(kind), *row))

    def __call__(self, step, params):
        from fast import mlp_spectra as fast_spectra  # the tracker's fused products

        one = {
            k: np.asarray(a[self.net : self.net + 1], dtype=np.float64) for k, a in params.items()
        }
        s = self.series
        if self.act is RELU:  # ReLU: the fused products of fast/mlp_spectra.py, into buffers
            if self._work is None:
                shape = (len(self.X), one["W1"].shape[2])  # (N, H) buffers, reused
                self._work = {"h1": np.empty(shape), "mask": np.empty(shape)}
            state = fast_spectra.net_state(one, self.X, work=self._work)
        else:  # softplus: the same products with its slope and curvature
            state = fast_spectra.net_state(one, self.X, act=self.act)
        logits = state["logits"][None]  # (1, N, K)
        signs = state["mask"] > 0.5  # (N, H)  z1 > 0 (the mask is 1[z1 > 0], or sigmoid(beta z1))
        theta = flatten(one)[0]  # (P,)
        if self._last is None or step <= self._hot_until or step % COLD_EVERY == 0:
            matvec = fast_spectra.hessian_matvec(state, self.y, self._gamma(step), self.loss)
            s["lam"][step], s["products"][step] = self._top(matvec, one, step, len(theta))
            if self.lr * s["lam"][step] >= 2.0 * HOT_FRACTION:
                self._hot_until = step + HOT_MEMORY
        if self._prev:
            p_one, p_theta, p_logits, p_signs = self._prev[-1]
            s["flips"][step] = (signs != p_signs).sum()
            dtheta = theta - p_theta  # the update of step - 1
            s["proj"][step - 1] = dtheta @ self._vec  # on the latest top eigenvector
            if self._dtheta is not None:
                norms = np.linalg.norm(dtheta) * np.linalg.norm(self._dtheta)
                s["cos"][step - 1] = dtheta @ self._dtheta / norms if norms > 0 else np.nan
            self._dtheta = dtheta
            if len(self._prev) == 2:
                _, _, pp_logits, pp_signs = self._prev[0]
                s["flipbacks"][step - 1] = ((p_signs != pp_signs) & (signs == pp_signs)).sum()
                s["amp_logits"][step - 1] = np.linalg.norm(logits - 2 * p_logits + pp_logits) / 4
            self._events(step, one, p_one)
        self._prev = (self._prev + [(one, theta, logits, signs)])[-2:]
        self._thetas = (self._thetas + [theta])[-(MODE_ORDER + 1) :]
        if len(self._thetas) == MODE_ORDER + 1:  # centred on step - MODE_ORDER/2
            c = alternating_amplitude(np.array(self._thetas) @ self._vec, MODE_ORDER)
            s["mode"][step - MODE_ORDER // 2] = c

    def force_step(self, t, params):
        """After update t, add f (-1)^t v to this network's parameters (in place): a period-two
        forcing of known size f along the top eigenvector v last measured. params: the
        training loop's W1 (M, D, H), ... (an after_update callback of train_reference)."""
        if not self.force or self._vec is None:
            return
        one = {k: a[self.net : self.net + 1] for k, a in params.items()}
        kick = unflatten(self.force * (-1.0) ** t * self._vec[None], one)
        for k in params:
            params[k][self.net] += kick[k][0]

    def _events(self, step, one, p_one):
        """Dense spectra where eta * midpoint crosses 2 upwards, and at the first step of a pair
        of opposite jumps of at least HESS_JUMP (where the Fig. 4 rule starts an instability)."""
        lam = self.series["lam"]
        if (
            step >= 2
            and self.lr * (lam[step] + lam[step - 1]) / 2
            > 2.0
            >= self.lr * (lam[step - 1] + lam[step - 2]) / 2
        ):
            self._dense(one, step, "onset")
        if step >= 3:
            d = np.diff(lam[step - 3 : step + 1])  # jumps at step - 2, step - 1, step
            pair = lambda a, b: min(abs(a), abs(b)) >= stability.HESS_JUMP and a * b < 0
            if pair(d[1], d[2]) and not pair(d[0], d[1]):
                self._dense(p_one, step - 1, "rule")

    def arrays(self):
        """The per-step series, the events (E, 6) and the verification counts, for np.savez."""
        out = dict(self.series)
        out["events"] = np.array(self.events, dtype=np.float64).reshape(-1, 2 + len(EVENT_FIELDS))
        out["verified"], out["replaced"] = np.int64(self.verified), np.int64(self.replaced)
        return out


# ---------------------------------------------------------------------------------------------
# The sweep: conditions x seeds, one unit per network
# ---------------------------------------------------------------------------------------------


CONDITION_KEYS = ("T0", "lr", "dtype", "noise", "beta", "force")  # what a condition fixes


def grid(T0s, lrs, dtypes, noises, betas, forces=(0.0,)):
    """The conditions of a command line, a product of its lists, in a fixed order: dicts of
    T0, lr, dtype, noise, beta (None: ReLU) and force (the period-two forcing's size)."""
    return [
        dict(T0=T0, lr=lr, dtype=dtype, noise=noise, beta=beta, force=force)
        for beta in betas
        for dtype in dtypes
        for noise in noises
        for force in forces
        for T0 in T0s
        for lr in lrs
    ]


def conditions(cfg):
    """The sweep's conditions (its sweep.json lists them; a later command may append more), each
    with its run's T = T0/lr and steps = periods T."""
    out = []
    for c in cfg["conditions"]:
        T = c["T0"] / c["lr"]
        out.append(dict(c, force=c.get("force", 0.0), T=T, steps=int(round(cfg["periods"] * T))))
    return out


def condition_name(c):
    """A file-name key that holds the condition's exact values (repr of the floats; "*" for a
    key that varies within a family)."""
    r = lambda v: v if v == "*" else repr(float(v))
    beta = "relu" if c["beta"] is None else f"softplus{r(c['beta'])}"
    force = f"_force{r(c['force'])}" if c.get("force", 0.0) != 0.0 else ""  # unforced: no key
    return f"T0{r(c['T0'])}_lr{r(c['lr'])}_{c['dtype']}_noise{r(c['noise'])}_{beta}{force}"


def onset_units(cfg):
    """(name, condition index, seed) of every unit, conditions outermost."""
    return [
        (f"{condition_name(c)}_s{s:05d}", i, s)
        for i, c in enumerate(conditions(cfg))
        for s in cfg["seeds"]
    ]


def onset_spec(cfg, c, seeds):
    """The TrainSpec of the networks ``seeds`` of condition ``c`` (every step logged)."""
    M = len(seeds)
    full = lambda v: np.full(M, float(v))
    return TrainSpec(
        A=full(cfg["A"]), T=full(c["T"]), stop_step=full(c["steps"] + 1), lr=c["lr"],
        steps=c["steps"], log_every=1, loss=cfg["loss"], val_every=c["steps"],
    )  # fmt: skip


NOISE_STREAM = 7  # the first word of every perturbation stream's seed


def perturb(params, size, rngs):
    """Add to each network m's parameters (in place) a random vector of norm ``size``, isotropic
    in the P parameters, drawn from rngs[m]. params : W1 (M, D, H), ..."""
    M = params["W1"].shape[0]
    for m in range(M):
        xi = {k: rngs[m].normal(size=v.shape[1:]) for k, v in params.items()}
        norm = np.sqrt(sum((a**2).sum() for a in xi.values()))
        for k in params:
            params[k][m] += (size / norm) * xi[k]


def track_onsets(params0, data, spec, c, seeds, xp=np, progress=None):
    """Train the networks ``seeds`` of condition ``c`` with spiral.train_reference (on the CPU:
    ``xp`` is NumPy) in its arithmetic (c["dtype"]) and activation (c["beta"]: None is ReLU),
    one OnsetTracker per network; after every update, each network's perturbation of norm
    c["noise"] (from np.random.default_rng([NOISE_STREAM, seed])) and its forcing c["force"].
    Returns (result, [arrays])."""
    act = activation(c["beta"])
    M = len(params0["W1"])
    trackers = [OnsetTracker(data[0], data[1], spec, m, c["force"], act) for m in range(M)]
    rngs = [np.random.default_rng([NOISE_STREAM, int(s)]) for s in seeds]

    def on_log(step, params):
        for tracker in trackers:
            tracker(step, params)

    def after_update(t, params):
        if c["noise"]:
            perturb(params, c["noise"], rngs)
        for tracker in trackers:
            tracker.force_step(t, params)

    kick = after_update if c["noise"] or c["force"] else None
    with threadpool_limits(limits=1):
        res = train_reference(params0, data, spec, on_log, progress, kick, act, c["dtype"])
    return res, [t.arrays() for t in trackers]


def run_onset(out, cfg, units, progress=True, workers=WORKERS):
    """Train the pending units of a prepared onset sweep, a condition's seeds split over the
    worker processes; store each network's series as its unit."""
    conds = conditions(cfg)
    data = spiral_data()
    by_cond = {}
    for u in units:
        by_cond.setdefault(u[1], []).append(u)
    jobs, members = [], []
    for i, group in by_cond.items():
        pieces = max(1, min(workers, len(group)))
        size = -(-len(group) // pieces)
        for j in range(0, len(group), size):
            part = group[j : j + size]
            seeds = [u[2] for u in part]
            params0 = init_mlp(seeds, D=D_SPIRAL, H=cfg["width"], K=K_SPIRAL, init=cfg["init"])
            jobs.append((params0, data, onset_spec(cfg, conds[i], seeds), conds[i], seeds))
            members.append(part)
    total = sum(len(m) * j[2].steps for m, j in zip(members, jobs, strict=True))
    bar = tqdm(total=total, unit="net-step", unit_scale=True, disable=not progress, mininterval=1)

    def done(k, result):
        res, arrays = result
        for m, u in enumerate(members[k]):
            unit = dict(arrays[m], loss=res["loss"][:, m], diverged_step=res["diverged_step"][m])
            sweeps.save_unit(out, u[0], unit)

    run_jobs(track_onsets, jobs, np, workers, bar=bar, done=done)
    bar.close()


def onset_expect(cfg):
    """name -> the fields a stored onset unit must have, with its run's length."""
    steps = {condition_name(c): c["steps"] for c in conditions(cfg)}

    def expect(name):
        S = steps[name.rsplit("_s", 1)[0]] + 1
        fields = {f: (S,) for f in SERIES}
        fields.update(loss=(S,), diverged_step=(), verified=(), replaced=())
        fields["events"] = lambda a: a.ndim == 2 and a.shape[1] == 2 + len(EVENT_FIELDS)
        return fields

    return expect
