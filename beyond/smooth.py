"""The smooth control of the onset experiment (beyond the paper): the MLP with softplus hidden
units, sigma(z) = log(1 + exp(beta z)) / beta, which has no kinks (beta -> infinity: ReLU).

    sigma'(z) = s = sigmoid(beta z),   sigma''(z) = beta s (1 - s).

:func:`softplus` returns a models.Activation, which every MLP function of models.py and spectra.py
takes as ``act``; models.py's docstring ("A smooth activation") derives the Hessian's extra
activation-curvature blocks and the R-operator's extra term that sigma'' brings.
"""

from __future__ import annotations

from functools import partial

from dynloss import get_array_module
from models import Activation


def softplus_forward(z, beta):
    """h = log(1 + exp(beta z)) / beta, elementwise. z : any shape;  beta : > 0.
    Returns h and the cache (z, beta)."""
    xp = get_array_module(z)
    return xp.logaddexp(0.0, beta * z) / beta, (z, beta)


def softplus_slope(cache):
    """sigma'(z) = sigmoid(beta z) from the cache (z, beta), without overflow; the shape of z."""
    z, beta = cache
    xp = get_array_module(z)
    return 0.5 * (1.0 + xp.tanh(0.5 * beta * z))


def softplus_backward(dh, cache):
    """dz = dh * sigma'(z)."""
    return dh * softplus_slope(cache)  # dF/dz = dF/dh * sigmoid(beta z)


def softplus_curvature(cache):
    """sigma''(z) = beta s (1 - s), s = sigmoid(beta z)."""
    s = softplus_slope(cache)
    return cache[1] * s * (1.0 - s)


def softplus(beta):
    """The softplus activation with this beta (> 0), for the ``act`` of the MLP functions."""
    forward = partial(softplus_forward, beta=float(beta))
    return Activation(f"softplus {beta:g}", forward, softplus_backward, softplus_slope,
                      softplus_curvature)  # fmt: skip


def activation(beta):
    """The onset experiment's ``beta`` setting as an activation: None is ReLU (the paper's)."""
    from models import RELU

    return RELU if beta is None else softplus(beta)
