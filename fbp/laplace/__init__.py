"""Post-hoc Laplace approximations of trained networks: ``fbp.laplace.fit`` builds the
posterior from fbp's curvature (the GGN diagonal, K-FAC, or the dense GGN of chosen layers —
the last layer), ``optimize_prior`` tunes the prior by the marginal likelihood or a validation
set, ``predict`` gives the linearised (probit or Monte-Carlo) or sampled predictive.

    la = fbp.laplace.fit(model, loss, params, x, y, structure="kfac")
    la = la.optimize_prior()            # a new posterior: the Laplace object is immutable
    probs = la.predict(x_test)
"""

from fbp.laplace.fitting import fit
from fbp.laplace.posterior import LIKELIHOODS, Laplace, likelihood_of
from fbp.laplace.structures import STRUCTURES, Dense, Diagonal, Kronecker

__all__ = ["LIKELIHOODS", "STRUCTURES", "Dense", "Diagonal", "Kronecker", "Laplace", "fit", "likelihood_of"]
