"""The Hessian's whole spectrum (beyond the paper, which follows lambda_max): its eigenvalue
density by stochastic Lanczos quadrature (Ghorbani et al. 2019; google/spectral-density) and its
trace by Hutchinson's estimator, from any symmetric matrix-vector product (spectra.py's exact
HVP); ``run_spiral.py density`` draws them along a run.
"""

from __future__ import annotations

import numpy as np

from spectra import lanczos, ritz_pairs

SLQ_STEPS = 80  # Lanczos steps per probe (Ghorbani et al. use 90)
SLQ_PROBES = 10  # random probes (Ghorbani et al.: 10)
SLQ_GRID = 10000  # density grid points (google/spectral-density's default)
SLQ_SIGMA = 1e-3  # Gaussian broadening in units of the spectral width
SLQ_PAD_SIGMAS = 6  # the density grid extends this many sigmas beyond the extreme nodes
HUTCHINSON_PROBES = 100  # Rademacher probes of the trace estimate


def slq_nodes(matvec, P, rng, m=SLQ_STEPS, n_probes=SLQ_PROBES):
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; google/spectral-density).

    For each of n_probes Gaussian probes v, m Lanczos steps give T = Q^T A Q; its eigenvalues
    are the quadrature nodes and the squared first components of its eigenvectors the weights:
    sum_i w_i f(node_i) ~ v^T f(A) v / |v|^2, whose mean over probes estimates (1/P) tr f(A).

    rng : np.random.Generator
    Returns nodes (n_probes, m), weights (n_probes, m); each probe's weights sum to 1 (probes
    whose Lanczos run stopped early are padded with weight 0).
    """
    m = min(m, P)
    nodes, weights = np.zeros((n_probes, m)), np.zeros((n_probes, m))
    for i in range(n_probes):
        alpha, beta, _ = lanczos(matvec, rng.normal(size=P), m)
        theta, S = ritz_pairs(alpha, beta[:-1])  # nodes ascending, (m', m')
        nodes[i, : len(theta)], nodes[i, len(theta) :] = theta, theta[-1]
        weights[i, : len(theta)] = S[0] ** 2
    return nodes, weights


def slq_density(nodes, weights, sigma=None, grid_len=SLQ_GRID):
    """Gaussian-broadened spectral density from SLQ nodes and weights (n_probes, m).

    sigma : broadening (eigenvalue units); default SLQ_SIGMA times the span of the nodes.
    The grid spans the nodes plus SLQ_PAD_SIGMAS sigma on each side and the density is normalised to
    integrate to 1 on it (a correction of order exp(-18) to the Gaussians' own mass).

    Returns grid (grid_len,), density (grid_len,).
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = SLQ_SIGMA * (hi - lo if hi > lo else max(abs(lo), 1.0))  # one node: |node|
    pad = SLQ_PAD_SIGMAS * sigma
    grid = np.linspace(lo - pad, hi + pad, grid_len)  # (grid_len,)
    density = np.zeros(grid_len)
    for nd, wt in zip(nodes, weights, strict=True):  # one probe at a time: (m, grid_len)
        gauss = np.exp(-0.5 * ((grid[None, :] - nd[:, None]) / sigma) ** 2)
        density += wt @ gauss / (sigma * np.sqrt(2 * np.pi))
    density /= (0.5 * (density[1:] + density[:-1]) * np.diff(grid)).sum()  # trapezoid rule
    return grid, density


def spectral_density(matvec, P, rng, m=SLQ_STEPS, n_probes=SLQ_PROBES, sigma=None):
    """SLQ spectral density of a symmetric operator: grid, density, nodes, weights.

    See :func:`slq_nodes` and :func:`slq_density`; density integrates to 1 over grid.
    """
    nodes, weights = slq_nodes(matvec, P, rng, m=m, n_probes=n_probes)
    grid, density = slq_density(nodes, weights, sigma=sigma)
    return grid, density, nodes, weights


def hutchinson_trace(matvec, P, rng, n_probes=HUTCHINSON_PROBES):
    """Hutchinson's trace estimate with Rademacher probes z: mean of z^T A z.

    Returns (estimate, standard error from the probes' spread).
    """
    samples = np.empty(n_probes)
    for i in range(n_probes):
        z = rng.choice([-1.0, 1.0], size=P)  # Rademacher
        samples[i] = z @ matvec(z)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(n_probes)
